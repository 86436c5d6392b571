"""The names of the daemon's virtual extended attributes, defined once: the adapter answers them (as bytes),
the commands read them.

They are not listed by listxattr (so `cp -a`/`tar --xattrs` never try to copy them) and cannot be set or
removed, except clone-from, the write-only request behind `reflinkfs clone`.
"""
PREFIX = "user.reflinkfs."
EXTENTS = PREFIX + "extents"        # a file's extent map, JSON; long maps continue in extents.<n>
STATUS = PREFIX + "status"          # on the root: cache, data-file and usage statistics
CLONE_FROM = PREFIX + "clone-from"  # set on a file to "<inode>" of a file the caller has open for reading
DU = PREFIX + "du"                  # du.<ino>.<ino>...: space used by the trees under those inodes, JSON
CLONE_TREE = PREFIX + "clone-tree"  # set on DST's parent: "<src inode>\0<token>\0<name>" (clone -r);
                                    # ...clone-tree.<token> on the root: that clone's progress and outcome
