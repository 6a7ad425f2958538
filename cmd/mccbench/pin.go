package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
)

// With -pin the benchmark runs the servers on one half of the CPUs and
// itself (the origin, the links and the clients) on the other, as if the
// gateway were a machine of its own: on a shared two-core machine the
// origin and the client of a direct download already keep both cores
// busy, so every byte a cache handles slows the direct download's own
// load generator down with it.

// pinnedEnv holds, for the benchmark process that runs on its half, the
// servers' CPU list and its own, "servers/mine" (taskset lists).
const pinnedEnv = "MCCBENCH_PINNED"

// serverCPUs and benchCPUs are the taskset CPU lists of the servers and of
// the benchmark; empty unpinned.
var serverCPUs, benchCPUs string

// pinned reads the CPU lists of a pinned run, and reports whether this is
// one.
func pinned() bool {
	v := os.Getenv(pinnedEnv)
	servers, mine, ok := strings.Cut(v, "/")
	if !ok {
		return false
	}
	serverCPUs, benchCPUs = servers, mine
	return true
}

// runPinned runs this benchmark again, with the same arguments, on the
// first half of the CPUs, its servers on the second.
func runPinned(args []string, out io.Writer) error {
	n := runtime.NumCPU()
	if n < 2 {
		return fmt.Errorf("-pin needs at least two CPUs")
	}
	half := n / 2
	mine, servers := fmt.Sprintf("0-%d", half-1), fmt.Sprintf("%d-%d", half, n-1)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command("taskset", append([]string{"-c", mine, self}, args...)...)
	cmd.Env = append(os.Environ(), pinnedEnv+"="+servers+"/"+mine)
	cmd.Stdout, cmd.Stderr = out, os.Stderr
	return cmd.Run()
}

// command returns the command that runs a server, on its CPUs when pinned.
func command(name string, args ...string) *exec.Cmd {
	if serverCPUs == "" {
		return exec.Command(name, args...)
	}
	return exec.Command("taskset", append([]string{"-c", serverCPUs, name}, args...)...)
}
