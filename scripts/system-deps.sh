#!/usr/bin/env bash
# Install the Debian packages the tests need, only when they are missing:
# DCMTK (storescu, echoscu, storescp, dsrdump), headless Chromium, dicom3tools
# (dciodvfy), Orthanc and its DICOMweb plugin (the PACS the results and pull tests
# use) and openssl (the
# TLS test's throw-away CA), strace (the test that records the system calls
# of one C-STORE) and PostgreSQL (the tests run initdb and pg_ctl in a temp dir;
# Debian keeps them off PATH, under /usr/lib/postgresql/VERSION/bin; its client
# package brings pg_dump and psql, which triage backup and restore run).
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 && command -v dsrdump >/dev/null 2>&1 || need+=(dcmtk)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
  || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
# The orthanc package starts its system service when installed; the tests run
# their own Orthanc on free ports and need none, so stop it if it did start.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
if printf '%s\n' "${need[@]}" | grep -qxE 'orthanc|orthanc-dicomweb'; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
# Likewise the postgresql package's own cluster: the tests start theirs on free ports.
if printf '%s\n' "${need[@]}" | grep -qx postgresql; then
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi
