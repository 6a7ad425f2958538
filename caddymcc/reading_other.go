//go:build !linux

package caddymcc

import "syscall"

// acked: only Linux tells what a TCP peer acknowledged.
func acked(syscall.RawConn) (uint64, bool) { return 0, false }

func setNotsentLowat(syscall.RawConn, int) bool { return false }
