package caddymcc

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// acked returns the bytes the connection's peer acknowledged (TCP_INFO's
// tcpi_bytes_acked, Linux 4.1 and later; 0 before, which never proves
// reading).
func acked(rc syscall.RawConn) (uint64, bool) {
	var info *unix.TCPInfo
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); cerr != nil || err != nil {
		return 0, false
	}
	return info.Bytes_acked, true
}

// setNotsentLowat sets the connection's TCP_NOTSENT_LOWAT (0: the system's
// default), and reports whether it did.
func setNotsentLowat(rc syscall.RawConn, n int) bool {
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, n)
	}); cerr != nil || err != nil {
		return false
	}
	return true
}
