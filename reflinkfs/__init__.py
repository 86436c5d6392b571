"""reflinkfs: a FUSE filesystem whose reflinked files share one page cache."""
