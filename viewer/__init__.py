"""The specialist's web viewer (worklist, case page, image viewer, reply); built in a later issue."""
