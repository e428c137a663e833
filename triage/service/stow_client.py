"""DICOMweb STOW-RS as origin: results' DICOM objects posted to a destination's DICOMweb root
with dicomweb-client, and the answer read per instance (PS3.18 10.5.3).

200 stores every instance. 202 stores some: the FailedSOPSequence names those that were
not, with a FailureReason that is a C-STORE status. 409 stores none (the reasons, when
the body has them, say whether a resend can help). Another 4xx (but 408 and 429) is a
refusal; 5xx, 408, 429 and no answer are a retry. The outbox's backoff does the
retrying, so dicomweb-client's own is off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from triage.config import DestinationConfig

log = logging.getLogger(__name__)

# FailureReasons after which a resend can succeed: Out of Resources (A7xx) and the
# Processing failure 0x0110 a busy server gives.
TRANSIENT = frozenset(range(0xA700, 0xA800)) | {0x0110}


@dataclass(frozen=True)
class StowAnswer:
    """One STOW-RS request's outcome: ``state`` "sent", "refused" or "retry"; per instance
    the FailureReason of those the server names as failed."""

    state: str
    http: int | None
    failed: dict[str, int] = field(default_factory=dict)
    error: str = ""


def client(dest: DestinationConfig, timeout_s: float) -> Any:
    """A dicomweb-client for ``dest`` (its auth header, TLS files, our timeout, no retries)."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    session = create_session()
    session.verify = dest.tls_ca_file or True
    if dest.tls_cert_file:
        session.cert = (dest.tls_cert_file, dest.tls_key_file)
    headers: dict[str, str] = {}
    if dest.bearer_token:
        headers["Authorization"] = f"Bearer {dest.bearer_token}"
    elif dest.basic_user:
        session.auth = (dest.basic_user, dest.basic_password)
    c = DICOMwebClient(url=dest.url.rstrip("/"), session=session, headers=headers,
                       timeout=timeout_s)
    c.set_http_retry_params(retry=False)
    return c


def failed_reasons(answer: Any) -> dict[str, int]:
    """{SOP Instance UID: FailureReason} from a Store Instances Response data set."""
    out: dict[str, int] = {}
    for item in answer.get("FailedSOPSequence", None) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if uid:
            out[uid] = int(item.get("FailureReason", 0x0110) or 0x0110)
    return out


def _response_dataset(response: Any) -> Any:
    from pydicom import Dataset

    try:
        return Dataset.from_json(response.json())
    except Exception:
        return Dataset()


def stow(dest: DestinationConfig, datasets: Sequence[Any], timeout_s: float) -> StowAnswer:
    """POST ``datasets`` to ``dest``'s /studies; return the answer. Never raises."""
    import requests

    try:
        answer = client(dest, timeout_s).store_instances(list(datasets))
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else None
        failed = failed_reasons(_response_dataset(e.response)) if e.response is not None else {}
        if code is not None and 400 <= code < 500 and code not in (408, 429):
            if code == 409 and failed and all(r in TRANSIENT for r in failed.values()):
                return StowAnswer("retry", code, failed)
            return StowAnswer("refused", code, failed)
        return StowAnswer("retry", code, failed)
    except (requests.RequestException, OSError) as e:
        return StowAnswer("retry", None, error=f"no answer ({type(e).__name__})")
    return StowAnswer("sent", 200, failed_reasons(answer))
