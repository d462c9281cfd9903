# Declarations only: the userfaultfd(2) subset that ext/_uffd.pyx wraps, and the few POSIX
# calls around it (poll, fallocate, mprotect, pthreads, sigaction) that Cython does not declare.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t


cdef extern from "<linux/userfaultfd.h>" nogil:
    enum:
        UFFD_API
        USERFAULTFD_IOC_NEW
        UFFD_USER_MODE_ONLY
        UFFDIO_API
        UFFDIO_REGISTER
        UFFDIO_UNREGISTER
        UFFDIO_WAKE
        UFFDIO_COPY
        UFFDIO_ZEROPAGE
        UFFDIO_WRITEPROTECT
        UFFDIO_CONTINUE
        UFFDIO_CONTINUE_MODE_DONTWAKE
        UFFD_EVENT_PAGEFAULT
        UFFD_PAGEFAULT_FLAG_WRITE
        UFFD_PAGEFAULT_FLAG_WP
        UFFD_PAGEFAULT_FLAG_MINOR
        UFFD_FEATURE_PAGEFAULT_FLAG_WP
        UFFD_FEATURE_MISSING_SHMEM
        UFFD_FEATURE_MINOR_SHMEM
        UFFD_FEATURE_SIGBUS
        UFFD_FEATURE_THREAD_ID
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM
        UFFDIO_REGISTER_MODE_MISSING
        UFFDIO_REGISTER_MODE_WP
        UFFDIO_REGISTER_MODE_MINOR
        UFFDIO_COPY_MODE_DONTWAKE
        UFFDIO_COPY_MODE_WP
        UFFDIO_ZEROPAGE_MODE_DONTWAKE
        UFFDIO_WRITEPROTECT_MODE_WP
        UFFDIO_WRITEPROTECT_MODE_DONTWAKE

    # only the members we touch; the unions inside are reached by name
    struct _uffd_pagefault:
        uint64_t flags
        uint64_t address
    union _uffd_msg_arg:
        _uffd_pagefault pagefault
    struct uffd_msg:
        uint8_t event
        _uffd_msg_arg arg

    struct uffdio_api:
        uint64_t api
        uint64_t features
        uint64_t ioctls
    struct uffdio_range:
        uint64_t start
        uint64_t len
    struct uffdio_register:
        uffdio_range range
        uint64_t mode
        uint64_t ioctls
    struct uffdio_copy:
        uint64_t dst
        uint64_t src
        uint64_t len
        uint64_t mode
        int64_t copy
    struct uffdio_zeropage:
        uffdio_range range
        uint64_t mode
        int64_t zeropage
    struct uffdio_writeprotect:
        uffdio_range range
        uint64_t mode
    struct uffdio_continue:
        uffdio_range range
        uint64_t mode
        int64_t mapped


cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_userfaultfd


cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLHUP
        POLLERR
        POLLRDHUP
    int poll(pollfd *fds, unsigned long nfds, int timeout)


cdef extern from "<fcntl.h>" nogil:
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
    int fallocate(int fd, int mode, long offset, long length)


cdef extern from "<sys/mman.h>" nogil:
    enum:
        PROT_NONE
    int mprotect(void *addr, size_t length, int prot)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)


cdef extern from "<signal.h>" nogil:
    ctypedef struct siginfo_t:
        int si_signo
        int si_code
        void *si_addr
    ctypedef struct sigset_t:
        pass
    struct sigaction_t "sigaction":
        void (*sa_sigaction)(int, siginfo_t *, void *) noexcept nogil
        sigset_t sa_mask
        int sa_flags
    enum:
        SA_SIGINFO
        SA_ONSTACK
        SA_NODEFER
        SIGSEGV
        SIGBUS
    int sigaction(int signum, const sigaction_t *act, sigaction_t *oldact)
    int sigemptyset(sigset_t *set)
