/*
 * reflinkfs.fuse._extops -- the FUSE request layer: one table of operations,
 * each answered by one Python method.
 *
 * Who owns what
 * -------------
 * pyfuse3 owns the session and the request loop: it mounts, its worker tasks
 * on the trio loop wait for /dev/fuse to be readable, receive each request
 * and hand it to libfuse's fuse_session_process_buf(), and it unmounts.  This
 * module owns every request: libfuse decodes a request and calls the handler
 * of *our* table (ll_* below), never pyfuse3's.  Each handler builds the
 * request's arguments and calls the method of the same name of the
 * operations object given to serve() (reflinkfs.fuse.adapter.Operations),
 * synchronously, in trio's thread, with the GIL held:
 *
 *   - the method returns the reply's value, and the handler replies at once
 *     (the shape of each value is listed with OPS below);
 *   - the method raises, and the handler asks the operations object's
 *     errno_of(op, exception) which errno to answer (one error boundary: an
 *     errno is never a return value, and always positive);
 *   - the method returns a coroutine (it has to wait: a commit, room in the
 *     write queue, the kernel), and the handler wraps the request in a
 *     Request and hands both to spawn(coroutine, request), which runs the
 *     coroutine as a task and answers with request.reply(value) or
 *     request.fail(exception) -- the same replies, later.
 * A request without a method in the table is answered ENOSYS by libfuse.
 *
 * How the table gets in: pyfuse3's extension calls libfuse's
 * fuse_session_new() -- in libfuse 3.17 an inline wrapper around
 * fuse_session_new_versioned@FUSE_3.17.  This module exports that symbol
 * (extops.map) and is loaded with RTLD_GLOBAL before pyfuse3, so the dynamic
 * linker binds pyfuse3's reference to ours; ours replaces pyfuse3's table
 * with this module's and calls the real function (dlvsym RTLD_NEXT).  Loaded
 * after pyfuse3, nothing is interposed; extops.interposed() tells, and the
 * mount refuses to go on without it.  fuse_session_destroy is interposed so
 * that a Request outliving its session never touches freed memory, and
 * fuse_session_process_buf for two things:
 *
 *   - Relabelling: Linux 6.18 sends FUSE_COPY_FILE_RANGE_64 first; its
 *     arguments are the older request's, and on a little-endian machine the
 *     older reply (a 32-bit count, then 32 zero bits) reads as the newer
 *     one's 64-bit count, so the newer request is relabelled as the older
 *     one before libfuse sees it (libfuse 3.17 does not know it either; an
 *     ENOSYS to two racing first copies could switch copy_file_range off for
 *     the whole mount).  Counts stay below 4 GiB (COPY_MAX).
 *   - Chains: pyfuse3's loop goes through trio for every request (a lock,
 *     wait_readable, a task switch), which costs more than serving a cached
 *     read.  So after a request answered at once, process_buf waits up to
 *     chain_wait_ns for the next request (ppoll, GIL released), receives it
 *     into the same buffer and processes it right away; the chain ends at a
 *     deferred request (its task needs the loop), after CHAIN_MAX requests or
 *     CHAIN_MAX_NS, at a timeout, a signal, an error or session exit.
 *
 * Passthrough (FUSE_CAP_PASSTHROUGH, Linux >= 6.9, libfuse >= 3.17): when
 * serve() asks for it, INIT asks the kernel for it (never with a writeback
 * cache, which would switch it off); backing_open(fd) registers a file the
 * kernel may read itself (FUSE_DEV_IOC_BACKING_OPEN on the session's
 * /dev/fuse) and backing_close(id) ends a registration.  An open method that
 * returns (fh, backing_id) instead of fh is answered with FOPEN_PASSTHROUGH to
 * that backing file, without direct_io or keep_cache (the kernel refuses
 * either with it: EIO, or reads through the daemon).  Which file, when, and
 * for which open is the daemon's decision (reflinkfs.fuse.passthrough).
 *
 * Writes: a write's data reaches the method as `bytes`, or for a big write
 * as a WriteData, a read-only buffer over libfuse's receive buffer (no copy);
 * a method that keeps a reference takes the receive buffer over (see
 * WriteData).  Reads: the method returns a list of buffers, replied as one
 * iovec (a reply made of several cache units is never joined).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, struct libfuse_version *, void *);
typedef void (*session_destroy_fn)(struct fuse_session *);
typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

/* The start of every request on /dev/fuse (struct fuse_in_header of the FUSE
 * protocol; libfuse does not install its copy of the kernel header). */
struct wire_in_header {
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
};
#define WIRE_COPY_FILE_RANGE 47
#define WIRE_COPY_FILE_RANGE_64 53
#define COPY_MAX ((size_t)0xfffff000u)   /* the older copy reply carries 32 bits */

/* Registering backing files for passthrough: the ioctls of /dev/fuse (struct
 * fuse_backing_map and FUSE_DEV_IOC_BACKING_* of the FUSE protocol, 7.40). */
struct wire_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define WIRE_DEV_IOC_BACKING_OPEN _IOW(229, 1, struct wire_backing_map)
#define WIRE_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

/* ---- the table ---------------------------------------------------------- */

/* How a method's value is replied. */
enum reply_kind {
    R_NONE,      /* forget: no reply */
    R_STATUS,    /* None -> success */
    R_ENTRY,     /* attributes -> an entry (lookup counted by the method) */
    R_ATTR,      /* attributes */
    R_OPEN,      /* file handle -> opened with the mount's direct_io / keep_cache;
                    (file handle, backing id) -> opened in passthrough to that backing file */
    R_OPENDIR,   /* directory handle */
    R_CREATE,    /* (file handle, attributes) */
    R_DATA,      /* a buffer, or a list or tuple of buffers (one iovec) */
    R_WRITE,     /* a byte count */
    R_READLINK,  /* bytes */
    R_STATFS,    /* (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, namemax) */
    R_XATTR,     /* bytes (listxattr: the names, each ended by a NUL) */
    R_DIRPLUS,   /* [(name, attributes, next offset), ...] from the offset on */
    R_OFFSET,    /* a file offset (lseek) */
};

/* Attributes are a tuple (ino, mode, nlink, uid, gid, rdev, size, blksize,
 * blocks in 512-byte units, atime_ns, mtime_ns, ctime_ns). */
enum op {
    OP_LOOKUP, OP_FORGET, OP_GETATTR, OP_SETATTR, OP_READLINK, OP_MKNOD, OP_MKDIR, OP_UNLINK,
    OP_RMDIR, OP_SYMLINK, OP_RENAME, OP_LINK, OP_OPEN, OP_READ, OP_WRITE, OP_RELEASE, OP_FSYNC,
    OP_OPENDIR, OP_READDIRPLUS, OP_RELEASEDIR, OP_FSYNCDIR, OP_STATFS, OP_SETXATTR, OP_GETXATTR,
    OP_LISTXATTR, OP_REMOVEXATTR, OP_CREATE, OP_FALLOCATE, OP_COPY_FILE_RANGE, OP_TMPFILE,
    OP_LSEEK, N_OPS
};

/* The method each request calls, its arguments, and how its value is replied. */
static const struct op_def {
    const char *name;
    enum reply_kind reply;
} OPS[N_OPS] = {
    [OP_LOOKUP] = {"lookup", R_ENTRY},                /* (parent, name) */
    [OP_FORGET] = {"forget", R_NONE},                 /* ([(ino, nlookup), ...]) */
    [OP_GETATTR] = {"getattr", R_ATTR},               /* (ino) */
    [OP_SETATTR] = {"setattr", R_ATTR},               /* (ino, to_set, mode, uid, gid, size, atime_ns,
                                                          mtime_ns, ctime_ns), to_set FUSE_SET_ATTR_* */
    [OP_READLINK] = {"readlink", R_READLINK},         /* (ino) */
    [OP_MKNOD] = {"mknod", R_ENTRY},                  /* (parent, name, mode, rdev, uid, gid, umask) */
    [OP_MKDIR] = {"mkdir", R_ENTRY},                  /* (parent, name, mode, uid, gid, umask) */
    [OP_UNLINK] = {"unlink", R_STATUS},               /* (parent, name) */
    [OP_RMDIR] = {"rmdir", R_STATUS},                 /* (parent, name) */
    [OP_SYMLINK] = {"symlink", R_ENTRY},              /* (parent, name, target, uid, gid) */
    [OP_RENAME] = {"rename", R_STATUS},               /* (parent, name, new_parent, new_name, flags) */
    [OP_LINK] = {"link", R_ENTRY},                    /* (ino, new_parent, new_name) */
    [OP_OPEN] = {"open", R_OPEN},                     /* (ino, flags, pid) -> fh | (fh, backing_id) */
    [OP_READ] = {"read", R_DATA},                     /* (fh, off, size) */
    [OP_WRITE] = {"write", R_WRITE},                  /* (fh, off, data) */
    [OP_RELEASE] = {"release", R_STATUS},             /* (fh) */
    [OP_FSYNC] = {"fsync", R_STATUS},                 /* (fh, datasync) */
    [OP_OPENDIR] = {"opendir", R_OPENDIR},            /* (ino) */
    [OP_READDIRPLUS] = {"readdirplus", R_DIRPLUS},    /* (fh, off, size) */
    [OP_RELEASEDIR] = {"releasedir", R_STATUS},       /* (fh) */
    [OP_FSYNCDIR] = {"fsyncdir", R_STATUS},           /* (fh, datasync) */
    [OP_STATFS] = {"statfs", R_STATFS},               /* (ino) */
    [OP_SETXATTR] = {"setxattr", R_STATUS},           /* (ino, name, value, flags, pid) */
    [OP_GETXATTR] = {"getxattr", R_XATTR},            /* (ino, name) */
    [OP_LISTXATTR] = {"listxattr", R_XATTR},          /* (ino) */
    [OP_REMOVEXATTR] = {"removexattr", R_STATUS},     /* (ino, name) */
    [OP_CREATE] = {"create", R_CREATE},               /* (parent, name, mode, flags, uid, gid, umask, pid) */
    [OP_FALLOCATE] = {"fallocate", R_STATUS},         /* (fh, mode, off, length) */
    [OP_COPY_FILE_RANGE] = {"copy_file_range", R_WRITE},  /* (fh_in, off_in, fh_out, off_out, length, flags) */
    [OP_TMPFILE] = {"tmpfile", R_CREATE},             /* (parent, mode, flags, uid, gid, umask, pid) */
    [OP_LSEEK] = {"lseek", R_OFFSET},                 /* (fh, off, whence), SEEK_DATA or SEEK_HOLE */
};

/* ---- state (the GIL protects everything Python touches) ------------------ */

static PyObject *m_op[N_OPS];              /* the bound methods, or NULL */
static PyObject *m_errno_of = NULL;        /* errno_of(op, exception) -> errno */
static PyObject *m_looked_up = NULL;       /* looked_up(ino): an entry readdirplus replied */
static PyObject *m_spawn = NULL;           /* spawn(coroutine, request) */
static PyObject *last_exc = NULL;          /* the last exception a method raised */
static double g_entry_timeout = 1.0, g_attr_timeout = 1.0;
static int g_direct_io = 1, g_keep_cache = 0, g_acl = 0;
static int g_passthrough_asked = 0;        /* serve(passthrough=True): INIT asks for it */
static int g_bound = 0;                    /* serve() was called */
static struct fuse_session *g_se = NULL;   /* the session our table went into (backing_open's ioctls) */
static volatile int g_interposed = 0;      /* our table went into a session */
static int g_deferred = 0;                 /* the request just processed was deferred */

/* What INIT negotiated (see ll_init). */
static int g_init_done = 0, g_allow_mmap = 0, g_posix_acl = 0, g_dont_mask = 0, g_passthrough = 0;
static const char *g_passthrough_why = "";   /* why INIT did not agree to passthrough ("" if it did) */
static unsigned g_proto_major = 0, g_proto_minor = 0;

static unsigned long long n_req[N_OPS], n_deferred[N_OPS], n_failed[N_OPS];
static unsigned long long n_copy_file_range_64 = 0;  /* copy requests sent as COPY_FILE_RANGE_64 */
static unsigned long long n_bad = 0;             /* values that could not be replied: EIO */
static unsigned long long n_dropped = 0;         /* deferred requests never answered: EIO */
static unsigned long long n_chained = 0;         /* requests received by a chain */
static unsigned long long n_passthrough_opens = 0;   /* opens answered with FOPEN_PASSTHROUGH */
#define CHAIN_MAX 256                            /* requests per chain, at most, */
#define CHAIN_MAX_NS 2000000LL                   /* ... and time: the loop's other work waits meanwhile */
static long chain_wait_ns = 100000;              /* how long a chain waits for the next request */

/* Bumped when a session is destroyed: a Request of an earlier generation is
 * abandoned instead of replied (that would be a use-after-free in libfuse). */
static unsigned long g_session_gen = 0;

/* Move the pending Python exception into last_exc and return a new reference to it. */
static PyObject *take_exception(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    Py_XSETREF(last_exc, Py_XNewRef(v));
    return v;
}

/* ---- WriteData: a big write's data, left where the kernel put it ------- */

/* A write of at least half a receive buffer reaches the method as a
 * WriteData: a read-only buffer over the request's bytes inside libfuse's
 * receive buffer, not a copy.  If the method keeps it (any reference, a
 * memoryview or a coroutine included, is still there when it returns), the
 * object takes the receive buffer over and the session gets another one for
 * its next receive: from a small pool of buffers freed by earlier WriteData
 * objects, or NULL, which libfuse's receive replaces with a new one.  If the
 * method drops it, the buffer stays the session's and nothing was copied or
 * allocated.  The bytes never change either way. */
typedef struct {
    PyObject_HEAD
    char *block;            /* the receive buffer this object owns, or NULL */
    const char *data;       /* the write's bytes (inside block once owned) */
    Py_ssize_t len;
} WriteDataObject;

static PyTypeObject WriteData_Type;
#define POOL_MAX 8                               /* spare receive buffers kept */
static char *g_pool[POOL_MAX];
static int g_pool_n = 0;
static struct fuse_buf *g_cur = NULL;            /* the receive buffer being processed */
static unsigned long long n_write_kept = 0;      /* receive buffers handed to WriteData */

static void pool_put(char *block)
{
    if (g_pool_n < POOL_MAX)
        g_pool[g_pool_n++] = block;
    else
        free(block);
}

/* A spare buffer at least as big as `need` bytes, or NULL. */
static char *pool_get(size_t need)
{
    while (g_pool_n > 0) {
        char *b = g_pool[--g_pool_n];
        if (malloc_usable_size(b) >= need)
            return b;
        free(b);
    }
    return NULL;
}

/* The write's data: a WriteData when it is a big write inside the buffer
 * being processed, else a bytes copy. */
static PyObject *write_data(const char *data, size_t size)
{
    struct fuse_buf *b = g_cur;
    if (b == NULL || (b->flags & FUSE_BUF_IS_FD) || b->mem == NULL
        || data < (const char *)b->mem || data + size > (const char *)b->mem + b->size
        || size < malloc_usable_size(b->mem) / 2)
        return PyBytes_FromStringAndSize(data, (Py_ssize_t)size);
    WriteDataObject *self = PyObject_New(WriteDataObject, &WriteData_Type);
    if (self == NULL)
        return NULL;
    self->block = NULL;
    self->data = data;
    self->len = (Py_ssize_t)size;
    return (PyObject *)self;
}

/* After the method: if it kept a WriteData, the WriteData takes the receive buffer over. */
static void write_data_done(PyObject *data)
{
    if (!Py_IS_TYPE(data, &WriteData_Type) || Py_REFCNT(data) == 1)
        return;
    WriteDataObject *self = (WriteDataObject *)data;
    struct fuse_buf *b = g_cur;
    char *block = b->mem;
    self->block = block;
    b->mem = pool_get(malloc_usable_size(block));
    n_write_kept++;
}

static void WriteData_dealloc(WriteDataObject *self)
{
    if (self->block != NULL)
        pool_put(self->block);
    PyObject_Free(self);
}

static int WriteData_getbuffer(WriteDataObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->data, self->len, 1, flags);
}

static Py_ssize_t WriteData_length(WriteDataObject *self)
{
    return self->len;
}

static PyObject *WriteData_repr(WriteDataObject *self)
{
    return PyUnicode_FromFormat("<WriteData of %zd bytes%s>", self->len, self->block ? ", kept" : "");
}

static PyBufferProcs WriteData_as_buffer = {.bf_getbuffer = (getbufferproc)WriteData_getbuffer};
static PySequenceMethods WriteData_as_sequence = {.sq_length = (lenfunc)WriteData_length};

static PyTypeObject WriteData_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "reflinkfs.fuse._extops.WriteData",
    .tp_basicsize = sizeof(WriteDataObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A write's data (read-only buffer), where the kernel put it; never changes.",
    .tp_dealloc = (destructor)WriteData_dealloc,
    .tp_repr = (reprfunc)WriteData_repr,
    .tp_as_buffer = &WriteData_as_buffer,
    .tp_as_sequence = &WriteData_as_sequence,
};

/* ---- replies -------------------------------------------------------------- */

static void set_time(struct timespec *ts, long long ns)
{
    long long sec = ns / 1000000000LL, rem = ns % 1000000000LL;
    if (rem < 0) {
        rem += 1000000000LL;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
}

static int fill_stat(PyObject *t, struct stat *st)
{
    unsigned long long ino, nlink, rdev;
    unsigned int mode, uid, gid;
    long long size, blksize, blocks, at, mt, ct;
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 12)
        return -1;
    if (!PyArg_ParseTuple(t, "KIKIIKLLLLLL", &ino, &mode, &nlink, &uid, &gid, &rdev, &size,
                          &blksize, &blocks, &at, &mt, &ct))
        return -1;
    memset(st, 0, sizeof(*st));
    st->st_ino = (ino_t)ino;
    st->st_mode = (mode_t)mode;
    st->st_nlink = (nlink_t)nlink;
    st->st_uid = (uid_t)uid;
    st->st_gid = (gid_t)gid;
    st->st_rdev = (dev_t)rdev;
    st->st_size = (off_t)size;
    st->st_blksize = (blksize_t)blksize;
    st->st_blocks = (blkcnt_t)blocks;
    set_time(&st->st_atim, at);
    set_time(&st->st_mtim, mt);
    set_time(&st->st_ctim, ct);
    return 0;
}

static int fill_entry(PyObject *t, struct fuse_entry_param *ep)
{
    memset(ep, 0, sizeof(*ep));
    if (fill_stat(t, &ep->attr) < 0)
        return -1;
    ep->ino = ep->attr.st_ino;
    ep->attr_timeout = g_attr_timeout;
    ep->entry_timeout = g_entry_timeout;
    return 0;
}

/* An int in [lo, hi] in *v, or -1. */
static int int_value(PyObject *res, long long lo, long long hi, long long *v)
{
    if (!PyLong_Check(res))
        return -1;
    *v = PyLong_AsLongLong(res);
    if (*v == -1 && PyErr_Occurred())
        return -1;
    return *v >= lo && *v <= hi ? 0 : -1;
}

#define READ_STACK_PARTS 40

/* A buffer, or a list or tuple of buffers sent as they are, one iovec each. */
static int reply_data(fuse_req_t req, PyObject *res)
{
    if (!PyList_CheckExact(res) && !PyTuple_CheckExact(res)) {
        Py_buffer one;
        if (PyObject_GetBuffer(res, &one, PyBUF_SIMPLE) < 0)
            return -1;
        fuse_reply_buf(req, one.buf, (size_t)one.len);
        PyBuffer_Release(&one);
        return 0;
    }
    PyObject **items = PySequence_Fast_ITEMS(res);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(res);
    if (n == 0) {
        fuse_reply_buf(req, NULL, 0);
        return 0;
    }
    Py_buffer stack_views[READ_STACK_PARTS];
    struct iovec stack_iov[READ_STACK_PARTS] = {{0}};
    Py_buffer *views = stack_views;
    struct iovec *iov = stack_iov;
    if (n > READ_STACK_PARTS) {
        views = PyMem_Malloc(n * sizeof(*views));
        iov = PyMem_Malloc(n * sizeof(*iov));
        if (views == NULL || iov == NULL) {
            PyMem_Free(views);
            PyMem_Free(iov);
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_ssize_t got = 0;
    int rc = 0;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(items[got], &views[got], PyBUF_SIMPLE) < 0) {
            rc = -1;
            break;
        }
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
    }
    if (rc == 0)
        fuse_reply_iov(req, iov, (int)n);  /* copies into the kernel before it returns */
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    if (views != stack_views) {
        PyMem_Free(views);
        PyMem_Free(iov);
    }
    return rc;
}

static int is_dot(const char *name)
{
    return name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'));
}

/* Pack the entries that fit in size bytes and reply them, then count a lookup
 * for each packed entry but "." and "..", as the kernel does (it sends FORGET
 * for them later); -1, with nothing counted or replied, if one is malformed. */
static int reply_dirplus(fuse_req_t req, PyObject *list, size_t size)
{
    if (!PyList_Check(list))
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(list), packed = 0;
    char *buf = PyMem_Malloc(size ? size : 1);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t used = 0;
    for (; packed < n; packed++) {
        PyObject *t = PyList_GET_ITEM(list, packed), *attrs;
        const char *name;
        long long next;
        struct fuse_entry_param ep;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(t, 0))
            || !PyArg_ParseTuple(t, "yOL", &name, &attrs, &next) || fill_entry(attrs, &ep) < 0) {
            PyMem_Free(buf);
            return -1;
        }
        size_t need = fuse_add_direntry_plus(req, NULL, 0, name, &ep, (off_t)next);
        if (used + need > size)
            break;
        fuse_add_direntry_plus(req, buf + used, size - used, name, &ep, (off_t)next);
        used += need;
    }
    for (Py_ssize_t i = 0; i < packed; i++) {
        PyObject *t = PyList_GET_ITEM(list, i);
        if (is_dot(PyBytes_AS_STRING(PyTuple_GET_ITEM(t, 0))))
            continue;
        PyObject *r = PyObject_CallOneArg(m_looked_up, PyTuple_GET_ITEM(PyTuple_GET_ITEM(t, 1), 0));
        if (r == NULL)
            Py_XDECREF(take_exception());      /* the entry is replied all the same */
        Py_XDECREF(r);
    }
    fuse_reply_buf(req, buf, used);
    PyMem_Free(buf);
    return 0;
}

/* A file or directory handle; backing_id > 0: a passthrough open of a file. */
static void set_file_info(struct fuse_file_info *fi, long long fh, int file, int backing_id)
{
    fi->fh = (uint64_t)fh;
    fi->backing_id = 0;
    if (file && backing_id > 0) {
        fi->backing_id = backing_id;   /* libfuse adds FOPEN_PASSTHROUGH */
        fi->direct_io = 0;             /* with it: reads through the daemon, mmap of the backing file */
        fi->keep_cache = 0;            /* with it: the kernel fails the open (EIO) */
        n_passthrough_opens++;
    } else if (file) {
        fi->direct_io = g_direct_io;
        fi->keep_cache = g_keep_cache;
    }
}

/* Reply a method's value; -1 (nothing replied, an exception may be set) if it
 * is not what the operation replies.  `fi` and `size` are the request's. */
static int reply_value(fuse_req_t req, int op, PyObject *res, struct fuse_file_info *fi, size_t size)
{
    struct fuse_entry_param ep;
    long long v;
    switch (OPS[op].reply) {
    case R_NONE:
        fuse_reply_none(req);
        return 0;
    case R_STATUS:
        if (res != Py_None)
            return -1;
        fuse_reply_err(req, 0);
        return 0;
    case R_ENTRY:
        if (fill_entry(res, &ep) < 0)
            return -1;
        fuse_reply_entry(req, &ep);
        return 0;
    case R_ATTR:
        if (fill_stat(res, &ep.attr) < 0)
            return -1;
        fuse_reply_attr(req, &ep.attr, g_attr_timeout);
        return 0;
    case R_OPEN:
        if (PyTuple_Check(res)) {      /* (fh, backing id): passthrough */
            long long id;
            if (!g_passthrough || PyTuple_GET_SIZE(res) != 2
                || int_value(PyTuple_GET_ITEM(res, 0), 0, INT64_MAX, &v) < 0
                || int_value(PyTuple_GET_ITEM(res, 1), 1, INT32_MAX, &id) < 0)
                return -1;
            set_file_info(fi, v, 1, (int)id);
            fuse_reply_open(req, fi);
            return 0;
        }
        /* fall through: a handle alone */
    case R_OPENDIR:
        if (int_value(res, 0, INT64_MAX, &v) < 0)
            return -1;
        set_file_info(fi, v, OPS[op].reply == R_OPEN, 0);
        fuse_reply_open(req, fi);
        return 0;
    case R_CREATE:
        if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2
            || int_value(PyTuple_GET_ITEM(res, 0), 0, INT64_MAX, &v) < 0
            || fill_entry(PyTuple_GET_ITEM(res, 1), &ep) < 0)
            return -1;
        set_file_info(fi, v, 1, 0);
        fuse_reply_create(req, &ep, fi);
        return 0;
    case R_DATA:
        return reply_data(req, res);
    case R_WRITE:
        if (int_value(res, 0, (long long)size, &v) < 0)
            return -1;
        fuse_reply_write(req, (size_t)v);
        return 0;
    case R_READLINK:
        if (!PyBytes_Check(res) || strlen(PyBytes_AS_STRING(res)) != (size_t)PyBytes_GET_SIZE(res))
            return -1;
        fuse_reply_readlink(req, PyBytes_AS_STRING(res));
        return 0;
    case R_STATFS: {
        unsigned long bsize, frsize, namemax;
        unsigned long long blocks, bfree, bavail, files, ffree, favail;
        if (!PyTuple_Check(res) || !PyArg_ParseTuple(res, "kkKKKKKKk", &bsize, &frsize, &blocks, &bfree,
                                                     &bavail, &files, &ffree, &favail, &namemax))
            return -1;
        struct statvfs s = {.f_bsize = bsize, .f_frsize = frsize, .f_blocks = blocks, .f_bfree = bfree,
                            .f_bavail = bavail, .f_files = files, .f_ffree = ffree, .f_favail = favail,
                            .f_namemax = namemax};
        fuse_reply_statfs(req, &s);
        return 0;
    }
    case R_XATTR:
        if (!PyBytes_Check(res))
            return -1;
        if (size == 0)
            fuse_reply_xattr(req, (size_t)PyBytes_GET_SIZE(res));
        else if ((size_t)PyBytes_GET_SIZE(res) > size)
            fuse_reply_err(req, ERANGE);
        else
            fuse_reply_buf(req, PyBytes_AS_STRING(res), (size_t)PyBytes_GET_SIZE(res));
        return 0;
    case R_DIRPLUS:
        return reply_dirplus(req, res, size);
    case R_OFFSET:
        if (int_value(res, 0, INT64_MAX, &v) < 0)
            return -1;
        fuse_reply_lseek(req, (off_t)v);
        return 0;
    }
    return -1;
}

/* Answer a request whose method raised `exc` (a new reference, may be NULL):
 * with the errno the operations object's errno_of gives, or EIO. */
static void reply_exception(fuse_req_t req, int op, PyObject *exc)
{
    int e = EIO;
    n_failed[op]++;
    if (exc != NULL && m_errno_of != NULL) {
        PyObject *r = PyObject_CallFunction(m_errno_of, "sO", OPS[op].name, exc);
        long long v;
        if (r != NULL && int_value(r, 1, 4095, &v) == 0)
            e = (int)v;
        else
            Py_XDECREF(take_exception());
        Py_XDECREF(r);
    }
    Py_XDECREF(exc);
    if (OPS[op].reply == R_NONE)
        fuse_reply_none(req);
    else
        fuse_reply_err(req, e);
}

/* A value that cannot be replied: EIO, and the reason kept as the last exception. */
static void reply_bad(fuse_req_t req, int op, PyObject *res)
{
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "%s returned %R", OPS[op].name, res);
    Py_XDECREF(take_exception());
    n_bad++;
    if (OPS[op].reply == R_NONE)
        fuse_reply_none(req);
    else
        fuse_reply_err(req, EIO);
}

/* ---- Request: a reply owed by a task ------------------------------------ */

typedef struct {
    PyObject_HEAD
    fuse_req_t req;                /* NULL once replied (or abandoned) */
    unsigned long gen;             /* g_session_gen at creation */
    int op;
    struct fuse_file_info fi;      /* the request's (open and create reply with it) */
    size_t size;                   /* the request's size (read, xattr, readdirplus, write count) */
} RequestObject;

static PyTypeObject Request_Type;

/* Take the request out exactly once: NULL with RuntimeError if it was taken,
 * NULL without an exception (*gone = 1) if its session is gone. */
static fuse_req_t Request_take(RequestObject *self, int *gone)
{
    *gone = 0;
    if (self->req == NULL) {
        PyErr_Format(PyExc_RuntimeError, "%s request has already been answered", OPS[self->op].name);
        return NULL;
    }
    fuse_req_t r = self->req;
    self->req = NULL;
    if (self->gen != g_session_gen) {
        *gone = 1;
        return NULL;
    }
    return r;
}

static PyObject *Request_reply(RequestObject *self, PyObject *value)
{
    int gone;
    fuse_req_t r = Request_take(self, &gone);
    if (r == NULL)
        return gone ? Py_NewRef(Py_False) : NULL;
    if (reply_value(r, self->op, value, &self->fi, self->size) < 0)
        reply_bad(r, self->op, value);
    return Py_NewRef(Py_True);
}

static PyObject *Request_fail(RequestObject *self, PyObject *exc)
{
    int gone;
    fuse_req_t r = Request_take(self, &gone);
    if (r == NULL)
        return gone ? Py_NewRef(Py_False) : NULL;
    reply_exception(r, self->op, Py_NewRef(exc));
    return Py_NewRef(Py_True);
}

static void Request_dealloc(RequestObject *self)
{
    if (self->req != NULL && self->gen == g_session_gen) {
        n_dropped++;
        fuse_reply_err(self->req, EIO);
    }
    PyObject_Free(self);
}

static PyObject *Request_repr(RequestObject *self)
{
    return PyUnicode_FromFormat("<Request %s%s>", OPS[self->op].name, self->req ? "" : " answered");
}

static PyObject *Request_get_op(RequestObject *s, void *c) { return PyUnicode_FromString(OPS[s->op].name); }
static PyObject *Request_get_answered(RequestObject *s, void *c) { return PyBool_FromLong(s->req == NULL); }

static PyGetSetDef Request_getset[] = {
    {"op", (getter)Request_get_op, NULL, "the operation's name", NULL},
    {"answered", (getter)Request_get_answered, NULL, "True once replied (or its session is gone)", NULL},
    {NULL}
};

static PyMethodDef Request_methods[] = {
    {"reply", (PyCFunction)Request_reply, METH_O,
     "reply(value) -> bool: answer with the operation's value, as if the method had returned it\n"
     "(False: the session is gone).  A second answer raises RuntimeError."},
    {"fail", (PyCFunction)Request_fail, METH_O,
     "fail(exception) -> bool: answer as if the method had raised it."},
    {NULL}
};

static PyTypeObject Request_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "reflinkfs.fuse._extops.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A request a task answers later, exactly once; unanswered, it is answered EIO when dropped.",
    .tp_dealloc = (destructor)Request_dealloc,
    .tp_repr = (reprfunc)Request_repr,
    .tp_methods = Request_methods,
    .tp_getset = Request_getset,
};

/* ---- serving a request ------------------------------------------------------ */

/* Hand a coroutine and its request to spawn(); if that fails, answer EIO. */
static void defer(fuse_req_t req, int op, struct fuse_file_info *fi, size_t size, PyObject *coro)
{
    n_deferred[op]++;
    g_deferred = 1;
    RequestObject *r = PyObject_New(RequestObject, &Request_Type);
    if (r == NULL) {
        PyObject *x = PyObject_CallMethod(coro, "close", NULL);
        Py_XDECREF(x);
        reply_exception(req, op, take_exception());
        return;
    }
    r->req = req;
    r->gen = g_session_gen;
    r->op = op;
    if (fi != NULL)
        r->fi = *fi;
    else
        memset(&r->fi, 0, sizeof(r->fi));
    r->size = size;
    PyObject *x = PyObject_CallFunctionObjArgs(m_spawn, coro, (PyObject *)r, NULL);
    if (x == NULL) {
        PyObject *exc = take_exception();
        PyObject *c = PyObject_CallMethod(coro, "close", NULL);
        Py_XDECREF(c);
        PyErr_Clear();
        if (r->req != NULL) {
            r->req = NULL;
            reply_exception(req, op, exc);
        } else {
            Py_XDECREF(exc);
        }
    }
    Py_XDECREF(x);
    Py_DECREF(r);
}

/* Call the method of `op` with `args` (stolen; NULL if building them failed)
 * and answer: its value now, its exception as an errno, or its coroutine
 * later.  The GIL is held and no exception is pending. */
static void serve(fuse_req_t req, int op, struct fuse_file_info *fi, size_t size, PyObject *args)
{
    n_req[op]++;
    PyObject *res = args != NULL ? PyObject_Call(m_op[op], args, NULL) : NULL;
    Py_XDECREF(args);
    if (res == NULL)
        reply_exception(req, op, take_exception());
    else if (PyCoro_CheckExact(res))
        defer(req, op, fi, size, res);
    else if (reply_value(req, op, res, fi, size) < 0)
        reply_bad(req, op, res);
    Py_XDECREF(res);
}

/* Every handler runs between these two: the GIL taken, and whatever exception
 * pyfuse3 had pending set aside (it checks PyErr_Occurred() after process_buf). */
typedef struct {
    PyGILState_STATE gs;
    PyObject *type, *value, *tb;
} py_section;

static void enter(py_section *s)
{
    s->gs = PyGILState_Ensure();
    PyErr_Fetch(&s->type, &s->value, &s->tb);
}

static void leave(py_section *s)
{
    PyErr_Restore(s->type, s->value, s->tb);
    PyGILState_Release(s->gs);
}

/* Serve `op` with arguments built from fmt (Py_BuildValue). */
static void call(fuse_req_t req, int op, struct fuse_file_info *fi, size_t size, const char *fmt, ...)
{
    py_section s;
    enter(&s);
    va_list va;
    va_start(va, fmt);
    PyObject *args = Py_VaBuildValue(fmt, va);
    va_end(va);
    serve(req, op, fi, size, args);
    leave(&s);
}

#define INO(x) ((unsigned long long)(x))
#define FH(fi) ((unsigned long long)((fi) ? (fi)->fh : 0))
#define NAME(n) (n), (Py_ssize_t)strlen(n)

/* ---- the handlers of the table ------------------------------------------------ */

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    call(req, OP_LOOKUP, NULL, 0, "(Ky#)", INO(parent), NAME(name));
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    py_section s;
    enter(&s);
    PyObject *list = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; list != NULL && i < count; i++) {
        PyObject *item = Py_BuildValue("(KK)", INO(forgets[i].ino), (unsigned long long)forgets[i].nlookup);
        if (item == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    serve(req, OP_FORGET, NULL, 0, list != NULL ? PyTuple_Pack(1, list) : NULL);
    Py_XDECREF(list);
    leave(&s);
}

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    struct fuse_forget_data one = {.ino = ino, .nlookup = nlookup};
    ll_forget_multi(req, 1, &one);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    call(req, OP_GETATTR, NULL, 0, "(K)", INO(ino));
}

static long long ns_of(const struct timespec *ts)
{
    return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    call(req, OP_SETATTR, NULL, 0, "(KiIIILLLL)", INO(ino), to_set, (unsigned)attr->st_mode,
         (unsigned)attr->st_uid, (unsigned)attr->st_gid, (long long)attr->st_size, ns_of(&attr->st_atim),
         ns_of(&attr->st_mtim), ns_of(&attr->st_ctim));
}

static void ll_readlink(fuse_req_t req, fuse_ino_t ino)
{
    call(req, OP_READLINK, NULL, 0, "(K)", INO(ino));
}

static void ll_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    call(req, OP_MKNOD, NULL, 0, "(Ky#IKIII)", INO(parent), NAME(name), (unsigned)mode,
         (unsigned long long)rdev, (unsigned)c->uid, (unsigned)c->gid, (unsigned)c->umask);
}

static void ll_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    call(req, OP_MKDIR, NULL, 0, "(Ky#IIII)", INO(parent), NAME(name), (unsigned)mode,
         (unsigned)c->uid, (unsigned)c->gid, (unsigned)c->umask);
}

static void ll_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    call(req, OP_UNLINK, NULL, 0, "(Ky#)", INO(parent), NAME(name));
}

static void ll_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    call(req, OP_RMDIR, NULL, 0, "(Ky#)", INO(parent), NAME(name));
}

static void ll_symlink(fuse_req_t req, const char *target, fuse_ino_t parent, const char *name)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    call(req, OP_SYMLINK, NULL, 0, "(Ky#y#II)", INO(parent), NAME(name), NAME(target),
         (unsigned)c->uid, (unsigned)c->gid);
}

static void ll_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t new_parent,
                      const char *new_name, unsigned int flags)
{
    call(req, OP_RENAME, NULL, 0, "(Ky#Ky#I)", INO(parent), NAME(name), INO(new_parent), NAME(new_name),
         flags);
}

static void ll_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t new_parent, const char *new_name)
{
    call(req, OP_LINK, NULL, 0, "(KKy#)", INO(ino), INO(new_parent), NAME(new_name));
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    call(req, OP_OPEN, fi, 0, "(KiK)", INO(ino), fi->flags, (unsigned long long)fuse_req_ctx(req)->pid);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    call(req, OP_READ, fi, size, "(KLK)", FH(fi), (long long)off, (unsigned long long)size);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    py_section s;
    enter(&s);
    PyObject *data = write_data(buf, size);
    serve(req, OP_WRITE, fi, size, data != NULL ? Py_BuildValue("(KLO)", FH(fi), (long long)off, data) : NULL);
    if (data != NULL) {
        write_data_done(data);
        Py_DECREF(data);
    }
    leave(&s);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    call(req, OP_RELEASE, fi, 0, "(K)", FH(fi));
}

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    call(req, OP_FSYNC, fi, 0, "(Ki)", FH(fi), datasync);
}

static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    call(req, OP_OPENDIR, fi, 0, "(K)", INO(ino));
}

static void ll_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    call(req, OP_READDIRPLUS, fi, size, "(KLK)", FH(fi), (long long)off, (unsigned long long)size);
}

static void ll_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    call(req, OP_RELEASEDIR, fi, 0, "(K)", FH(fi));
}

static void ll_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    call(req, OP_FSYNCDIR, fi, 0, "(Ki)", FH(fi), datasync);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino)
{
    call(req, OP_STATFS, NULL, 0, "(K)", INO(ino));
}

static void ll_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                        int flags)
{
    call(req, OP_SETXATTR, NULL, 0, "(Ky#y#iK)", INO(ino), NAME(name), value, (Py_ssize_t)size, flags,
         (unsigned long long)fuse_req_ctx(req)->pid);
}

static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    call(req, OP_GETXATTR, NULL, size, "(Ky#)", INO(ino), NAME(name));
}

static void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    call(req, OP_LISTXATTR, NULL, size, "(K)", INO(ino));
}

static void ll_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    call(req, OP_REMOVEXATTR, NULL, 0, "(Ky#)", INO(ino), NAME(name));
}

static void ll_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    call(req, OP_CREATE, fi, 0, "(Ky#IiIIIK)", INO(parent), NAME(name), (unsigned)mode, fi->flags,
         (unsigned)c->uid, (unsigned)c->gid, (unsigned)c->umask, (unsigned long long)c->pid);
}

static void ll_tmpfile(fuse_req_t req, fuse_ino_t parent, mode_t mode, struct fuse_file_info *fi)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    call(req, OP_TMPFILE, fi, 0, "(KIiIIIK)", INO(parent), (unsigned)mode, fi->flags, (unsigned)c->uid,
         (unsigned)c->gid, (unsigned)c->umask, (unsigned long long)c->pid);
}

/* Only SEEK_DATA and SEEK_HOLE reach a daemon: the kernel does SEEK_SET,
 * SEEK_CUR and SEEK_END itself. */
static void ll_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    call(req, OP_LSEEK, fi, 0, "(KLi)", FH(fi), (long long)off, whence);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length,
                         struct fuse_file_info *fi)
{
    call(req, OP_FALLOCATE, fi, 0, "(KiLL)", FH(fi), mode, (long long)off, (long long)length);
}

static void ll_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in, struct fuse_file_info *fi_in,
                               fuse_ino_t ino_out, off_t off_out, struct fuse_file_info *fi_out,
                               size_t len, int flags)
{
    size_t n = len < COPY_MAX ? len : COPY_MAX;
    call(req, OP_COPY_FILE_RANGE, NULL, n, "(KLKLKi)", FH(fi_in), (long long)off_in, FH(fi_out),
         (long long)off_out, (unsigned long long)n, flags);
}

/* INIT: what the mount asks of the kernel.
 * - READDIRPLUS always (the kernel then lists directories with it; no READDIR
 *   comes), and export support, as pyfuse3 asked.
 * - Unmasked modes (FUSE_CAP_DONT_MASK): create, mkdir, mknod and tmpfile
 *   modes come with the umask beside them, and the methods apply the umask,
 *   or the directory's default ACL instead (without it the kernel applies the
 *   umask itself, even where a default ACL should replace it).
 * - POSIX ACLs, when serve() was told so: the kernel enforces them.
 * - Shared mappings of direct_io files (FUSE_CAP_DIRECT_IO_ALLOW_MMAP, kernel
 *   >= 6.6): without it the kernel refuses MAP_SHARED of every file opened
 *   with direct_io (ENODEV).  With it, the kernel keeps a mapped inode's page
 *   cache coherent with direct reads and writes itself: a direct read or
 *   write first writes back the dirty pages of its range, and a direct write
 *   drops the cached pages it covers.
 * - Passthrough, when serve() was told so and the kernel offers it, with
 *   backing files on a filesystem that is not itself stacked (so overlayfs
 *   may still stack over this mount), and never a writeback cache (with one,
 *   the kernel turns passthrough off).  Why not, when not, is kept for
 *   negotiated(): the daemon says it once. */
static void ll_init(void *userdata, struct fuse_conn_info *conn)
{
    conn->want &= ~(FUSE_CAP_READDIRPLUS_AUTO | FUSE_CAP_WRITEBACK_CACHE);
    unsigned optional = FUSE_CAP_EXPORT_SUPPORT | FUSE_CAP_DONT_MASK | FUSE_CAP_DIRECT_IO_ALLOW_MMAP
                        | (g_acl ? FUSE_CAP_POSIX_ACL : 0);
    conn->want |= conn->capable & optional;
    g_passthrough = 0;
    g_passthrough_why = "";
#ifdef FUSE_CAP_PASSTHROUGH
    if (!g_passthrough_asked)
        g_passthrough_why = "turned off (--passthrough off)";
    else if (!(conn->capable & FUSE_CAP_PASSTHROUGH))
        g_passthrough_why = "the kernel does not offer it (Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH needed)";
    else {
        conn->want |= FUSE_CAP_PASSTHROUGH;
        conn->max_backing_stack_depth = FUSE_BACKING_STACKED_UNDER;
        g_passthrough = 1;
    }
#else
    g_passthrough_why = "libfuse is too old (>= 3.17 needed)";
#endif
    g_allow_mmap = (conn->want & FUSE_CAP_DIRECT_IO_ALLOW_MMAP) != 0;
    g_posix_acl = (conn->want & FUSE_CAP_POSIX_ACL) != 0;
    g_dont_mask = (conn->want & FUSE_CAP_DONT_MASK) != 0;
    g_proto_major = conn->proto_major;
    g_proto_minor = conn->proto_minor;
    g_init_done = 1;
}

/* ---- the interposed libfuse entry points ------------------------------- */

/* libfuse 3.17's fuse_session_new() is an inline wrapper around this one,
 * so this is the symbol a pyfuse3 compiled against it binds.  pyfuse3's table
 * is set aside: the session gets ours, with the operations serve() bound. */
EXPORT struct fuse_session *
fuse_session_new_versioned(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                           size_t op_size, struct libfuse_version *version, void *userdata)
{
    session_new_fn real = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new_versioned", "FUSE_3.17");
    if (real == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    if (op == NULL || !g_bound)
        return real(args, op, op_size, version, userdata);
    struct fuse_lowlevel_ops ops;
    memset(&ops, 0, sizeof(ops));      /* libfuse copies the table into the session */
    ops.init = ll_init;
#define ROUTE(OPNAME, field, handler) \
    if (m_op[OPNAME] != NULL)          \
        ops.field = handler
    ROUTE(OP_LOOKUP, lookup, ll_lookup);
    ROUTE(OP_FORGET, forget, ll_forget);
    ROUTE(OP_FORGET, forget_multi, ll_forget_multi);
    ROUTE(OP_GETATTR, getattr, ll_getattr);
    ROUTE(OP_SETATTR, setattr, ll_setattr);
    ROUTE(OP_READLINK, readlink, ll_readlink);
    ROUTE(OP_MKNOD, mknod, ll_mknod);
    ROUTE(OP_MKDIR, mkdir, ll_mkdir);
    ROUTE(OP_UNLINK, unlink, ll_unlink);
    ROUTE(OP_RMDIR, rmdir, ll_rmdir);
    ROUTE(OP_SYMLINK, symlink, ll_symlink);
    ROUTE(OP_RENAME, rename, ll_rename);
    ROUTE(OP_LINK, link, ll_link);
    ROUTE(OP_OPEN, open, ll_open);
    ROUTE(OP_READ, read, ll_read);
    ROUTE(OP_WRITE, write, ll_write);
    ROUTE(OP_RELEASE, release, ll_release);
    ROUTE(OP_FSYNC, fsync, ll_fsync);
    ROUTE(OP_OPENDIR, opendir, ll_opendir);
    ROUTE(OP_READDIRPLUS, readdirplus, ll_readdirplus);
    ROUTE(OP_RELEASEDIR, releasedir, ll_releasedir);
    ROUTE(OP_FSYNCDIR, fsyncdir, ll_fsyncdir);
    ROUTE(OP_STATFS, statfs, ll_statfs);
    ROUTE(OP_SETXATTR, setxattr, ll_setxattr);
    ROUTE(OP_GETXATTR, getxattr, ll_getxattr);
    ROUTE(OP_LISTXATTR, listxattr, ll_listxattr);
    ROUTE(OP_REMOVEXATTR, removexattr, ll_removexattr);
    ROUTE(OP_CREATE, create, ll_create);
    ROUTE(OP_FALLOCATE, fallocate, ll_fallocate);
    ROUTE(OP_COPY_FILE_RANGE, copy_file_range, ll_copy_file_range);
    ROUTE(OP_TMPFILE, tmpfile, ll_tmpfile);
    ROUTE(OP_LSEEK, lseek, ll_lseek);
#undef ROUTE
    /* No flush: the kernel takes ENOSYS to mean close() has nothing to wait
     * for and sends no FLUSH again.  No access: with default_permissions the
     * kernel checks permissions itself.  No locks: the kernel keeps them. */
    g_interposed = 1;
    g_se = real(args, &ops, sizeof(ops), version, userdata);
    return g_se;
}

EXPORT void fuse_session_destroy(struct fuse_session *se)
{
    session_destroy_fn real = (session_destroy_fn)dlvsym(RTLD_NEXT, "fuse_session_destroy", "FUSE_3.0");
    __atomic_add_fetch(&g_session_gen, 1, __ATOMIC_SEQ_CST);
    if (se == g_se)
        g_se = NULL;
    if (real != NULL)
        real(se);
}

/* Relabel (see the top of this file), then hand the request to libfuse. */
static void process_one(process_buf_fn real, struct fuse_session *se, const struct fuse_buf *buf)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (g_interposed && !(buf->flags & FUSE_BUF_IS_FD) && buf->mem != NULL
        && buf->size >= sizeof(struct wire_in_header)) {
        struct wire_in_header *in = (struct wire_in_header *)buf->mem;
        if (in->opcode == WIRE_COPY_FILE_RANGE_64) {
            in->opcode = WIRE_COPY_FILE_RANGE;
            n_copy_file_range_64++;
        }
    }
#endif
    g_cur = (struct fuse_buf *)buf;         /* for write_data */
    g_deferred = 0;
    real(se, buf);
    g_cur = NULL;
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait up to chain_wait_ns for the next request; 1 if one is there. */
static int next_request_ready(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    struct timespec ts = {.tv_sec = 0, .tv_nsec = chain_wait_ns};
    int r;
    if (PyGILState_Check()) {
        Py_BEGIN_ALLOW_THREADS
        r = ppoll(&p, 1, &ts, NULL);
        Py_END_ALLOW_THREADS
    } else {
        r = ppoll(&p, 1, &ts, NULL);
    }
    return r == 1 && (p.revents & (POLLIN | POLLERR | POLLHUP)) == POLLIN;
}

EXPORT void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    static process_buf_fn real = NULL;
    if (real == NULL) {
        real = (process_buf_fn)dlvsym(RTLD_NEXT, "fuse_session_process_buf", "FUSE_3.0");
        if (real == NULL)
            return;   /* cannot happen with libfuse3 loaded; nothing sane to do */
    }
    process_one(real, se, buf);
    /* Chain.  The buffer is pyfuse3's receive buffer: free again, since the
     * request has been answered or its data kept (see write_data_done). */
    struct fuse_buf *b = (struct fuse_buf *)buf;
    int chain = g_interposed && chain_wait_ns > 0 && !g_deferred;
    long long deadline = chain ? now_ns() + CHAIN_MAX_NS : 0;
    for (int i = 0; chain && i < CHAIN_MAX && !fuse_session_exited(se); i++) {
        if (now_ns() >= deadline || !next_request_ready(fuse_session_fd(se)))
            break;
        if (fuse_session_receive_buf(se, b) <= 0)
            break;                          /* EINTR, ENOENT, or exit: the loop sees it next */
        n_chained++;
        process_one(real, se, b);
        chain = !g_deferred;
    }
}

/* ---- module functions --------------------------------------------------- */

static PyObject *m_serve(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ops", "spawn", "direct_io", "keep_cache", "entry_timeout", "attr_timeout",
                             "acl", "passthrough", NULL};
    PyObject *ops, *spawn;
    int dio = 1, kc = 0, acl = 0, pt = 0;
    double et = 1.0, at = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$ppddpp:serve", kwlist, &ops, &spawn, &dio, &kc, &et, &at,
                                     &acl, &pt))
        return NULL;
    if (!PyCallable_Check(spawn)) {
        PyErr_SetString(PyExc_TypeError, "spawn must be callable");
        return NULL;
    }
    if (!(et >= 0) || !(at >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeouts must be >= 0");
        return NULL;
    }
    PyObject *errno_of = PyObject_GetAttrString(ops, "errno_of");
    PyObject *looked_up = errno_of ? PyObject_GetAttrString(ops, "looked_up") : NULL;
    if (looked_up == NULL) {
        Py_XDECREF(errno_of);
        return NULL;
    }
    for (int i = 0; i < N_OPS; i++) {
        PyObject *m = PyObject_GetAttrString(ops, OPS[i].name);
        if (m == NULL)
            PyErr_Clear();                  /* not served: libfuse answers ENOSYS */
        Py_XSETREF(m_op[i], m);
    }
    Py_XSETREF(m_errno_of, errno_of);
    Py_XSETREF(m_looked_up, looked_up);
    Py_XSETREF(m_spawn, Py_NewRef(spawn));
    g_direct_io = dio;
    g_keep_cache = kc;
    g_entry_timeout = et;
    g_attr_timeout = at;
    g_acl = acl;
    g_passthrough_asked = pt;
    g_bound = 1;
    Py_RETURN_NONE;
}

static PyObject *m_set_chain_wait(PyObject *mod, PyObject *arg)
{
    long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred())
        return NULL;
    if (us < 0 || us >= 1000000) {
        PyErr_SetString(PyExc_ValueError, "the chain wait must be 0 to 999999 microseconds");
        return NULL;
    }
    chain_wait_ns = us * 1000;
    Py_RETURN_NONE;
}

static PyObject *m_interposed(PyObject *mod, PyObject *unused)
{
    return PyBool_FromLong(g_interposed);
}

static PyObject *m_negotiated(PyObject *mod, PyObject *unused)
{
    if (!g_init_done)
        Py_RETURN_NONE;
    return Py_BuildValue("{s:s,s:(II),s:O,s:O,s:O,s:O,s:s}", "libfuse", fuse_pkgversion(),
                         "protocol", g_proto_major, g_proto_minor,
                         "direct_io_allow_mmap", g_allow_mmap ? Py_True : Py_False,
                         "posix_acl", g_posix_acl ? Py_True : Py_False,
                         "dont_mask", g_dont_mask ? Py_True : Py_False,
                         "passthrough", g_passthrough ? Py_True : Py_False,
                         "passthrough_unavailable", g_passthrough_why);
}

/* backing_open(fd) -> id: register an open file as a backing file of the
 * session (the kernel keeps its own reference; fd may be closed after). */
static PyObject *m_backing_open(PyObject *mod, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return NULL;
    }
    if (g_se == NULL || !g_passthrough) {
        PyErr_SetString(PyExc_RuntimeError, "no session with passthrough");
        return NULL;
    }
    struct wire_backing_map map = {.fd = (int32_t)fd};
    int id;
    Py_BEGIN_ALLOW_THREADS
    id = ioctl(fuse_session_fd(g_se), WIRE_DEV_IOC_BACKING_OPEN, &map);
    Py_END_ALLOW_THREADS
    if (id < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (id == 0) {
        errno = EPROTO;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(id);
}

/* backing_close(id): end a registration; files open through it keep reading it. */
static PyObject *m_backing_close(PyObject *mod, PyObject *arg)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (v <= 0 || v > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "a backing id is a positive 32-bit integer");
        return NULL;
    }
    if (g_se == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no session");
        return NULL;
    }
    uint32_t id = (uint32_t)v;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = ioctl(fuse_session_fd(g_se), WIRE_DEV_IOC_BACKING_CLOSE, &id);
    Py_END_ALLOW_THREADS
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *m_counts(PyObject *mod, PyObject *unused)
{
    PyObject *per = PyDict_New();
    for (int i = 0; per != NULL && i < N_OPS; i++) {
        if (n_req[i] == 0)
            continue;
        PyObject *v = Py_BuildValue("{s:K,s:K,s:K}", "requests", n_req[i], "deferred", n_deferred[i],
                                    "failed", n_failed[i]);
        if (v == NULL || PyDict_SetItemString(per, OPS[i].name, v) < 0)
            Py_CLEAR(per);
        Py_XDECREF(v);
    }
    if (per == NULL)
        return NULL;
    return Py_BuildValue("{s:N,s:K,s:K,s:K,s:K,s:K,s:K}", "ops", per, "chained", n_chained,
                         "write_kept", n_write_kept, "copy_file_range_64", n_copy_file_range_64,
                         "bad_values", n_bad, "dropped", n_dropped, "passthrough_opens", n_passthrough_opens);
}

static PyObject *m_last_exception(PyObject *mod, PyObject *unused)
{
    return Py_NewRef(last_exc != NULL ? last_exc : Py_None);
}

static PyMethodDef module_methods[] = {
    {"serve", (PyCFunction)(void (*)(void))m_serve, METH_VARARGS | METH_KEYWORDS,
     "serve(ops, spawn, *, direct_io=True, keep_cache=False, entry_timeout=1.0, attr_timeout=1.0,\n"
     "      acl=False, passthrough=False)\n\n"
     "Answer every request of the next session with ops' methods (see the module's C source);\n"
     "call before pyfuse3.init()."},
    {"set_chain_wait", m_set_chain_wait, METH_O,
     "set_chain_wait(wait_us): how long a chain waits for the next request (0: no chains)."},
    {"interposed", m_interposed, METH_NOARGS, "interposed() -> bool: the session got this table."},
    {"negotiated", m_negotiated, METH_NOARGS,
     "negotiated() -> dict | None: libfuse's version and what INIT agreed; None before INIT."},
    {"backing_open", m_backing_open, METH_O,
     "backing_open(fd) -> id: register a backing file for passthrough opens (OSError if refused)."},
    {"backing_close", m_backing_close, METH_O, "backing_close(id): end a backing file's registration."},
    {"counts", m_counts, METH_NOARGS, "counts() -> dict: requests per operation, and the layer's own counts."},
    {"last_exception", m_last_exception, METH_NOARGS,
     "last_exception() -> BaseException | None: the last exception a method raised."},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "reflinkfs.fuse._extops",
    .m_doc = "The FUSE request layer: one table of operations, each answered by one Python method.",
    .m_size = -1,
    .m_methods = module_methods,
};

EXPORT PyMODINIT_FUNC PyInit__extops(void)
{
    if (PyType_Ready(&Request_Type) < 0 || PyType_Ready(&WriteData_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Request", (PyObject *)&Request_Type) < 0
        || PyModule_AddObjectRef(m, "WriteData", (PyObject *)&WriteData_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
