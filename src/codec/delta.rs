//! XBZRLE-like delta encoding against the previously sent version of a page (planned).
