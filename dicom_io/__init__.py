"""Everything that speaks DICOM: the SCP, the durable spool, pixel decoding and writers.

Nothing in this package knows about models, databases or HTML; the application
hands in callbacks.
"""
