"""The specialist's web viewer (worklist, case, images, reply); built in a later issue."""
