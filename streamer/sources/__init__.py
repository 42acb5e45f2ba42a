"""Where CDRs come from: the web feed and file drops, each handing rows to the one drive loop."""
