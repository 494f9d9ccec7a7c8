"""DICOM over the network (pynetdicom): association control, C-ECHO, C-STORE."""
