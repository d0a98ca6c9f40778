"""Write + fdatasync probe: buffered over zeroed blocks against O_DIRECT over
written ones, in a 64 MiB file like a stream-log segment (BENCHMARKS.md,
"the log written past the page cache"). Linux only.

usage: python3 benches/sync_probe.py [GROUP_BYTES] [DIR]
(defaults: 225 KiB groups, the current directory; DIR must be on the disk
under test, not a tmpfs)."""
import os, time, mmap, ctypes, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
FALLOC_FL_KEEP_SIZE=1; FALLOC_FL_ZERO_RANGE=0x10
SEG = 64<<20
path = os.path.join(sys.argv[2] if len(sys.argv) > 2 else ".", "sync-probe.seg")
def prep(written):
    fd = os.open(path, os.O_RDWR|os.O_CREAT|os.O_TRUNC, 0o600)
    blk = os.urandom(1<<20)
    for i in range(SEG>>20): os.write(fd, blk)
    os.fsync(fd)
    if not written:
        libc.fallocate(fd, FALLOC_FL_ZERO_RANGE|FALLOC_FL_KEEP_SIZE, ctypes.c_long(0), ctypes.c_long(SEG))
        os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
GROUP = int(sys.argv[1]) if len(sys.argv)>1 else 225*1024
def run(mode):
    prep(written = (mode=="direct"))
    flags = os.O_RDWR | (os.O_DIRECT if mode=="direct" else 0)
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, GROUP + 8192)
    buf.write(os.urandom(GROUP+8192))
    off = 0; n=0; lat=[]
    t0=time.monotonic(); c0=os.times(); s0=open('/proc/stat').readline().split()
    while off + GROUP + 8192 < SEG:
        t=time.monotonic()
        if mode=="direct":
            start = off & ~4095
            end = (off+GROUP+4095) & ~4095
            os.pwritev(fd, [memoryview(buf)[:end-start]], start)
        else:
            os.pwrite(fd, memoryview(buf)[:GROUP], off)
        os.fdatasync(fd)
        lat.append(time.monotonic()-t)
        off += GROUP; n+=1
    dt=time.monotonic()-t0; c1=os.times(); s1=open('/proc/stat').readline().split()
    lat.sort()
    sysd=[int(b)-int(a) for a,b in zip(s0[1:],s1[1:])]
    busy=(sum(sysd)-sysd[3]-sysd[4])/ (sum(sysd)) *2
    print(f"{mode:9s} group {GROUP>>10} KiB: {n/dt:.0f} syncs/s, {off/dt/1e6:.0f} MB/s, p50 {lat[len(lat)//2]*1e6:.0f} us p99 {lat[int(len(lat)*.99)]*1e6:.0f} us; proc cpu/op {((c1.user+c1.system)-(c0.user+c0.system))/n*1e6:.0f} us; machine busy cores {busy:.2f}")
    os.close(fd)
for m in ["zeroed","direct","zeroed","direct"]: run(m)
os.unlink(path)
