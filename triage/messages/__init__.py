"""Results as messages for the RIS and the EHR: HL7 v2 over MLLP and FHIR R4 over HTTP.

The builders (:mod:`.hl7`, :mod:`.fhir`) take a :class:`~.facts.ResultFacts`
and return a message; they touch no network, disk or clock. The transports
(:mod:`.mllp`, :mod:`.http`) only move bytes and map the answer to an
:class:`~.facts.Outcome`. The outbox sender joins the two.
"""
