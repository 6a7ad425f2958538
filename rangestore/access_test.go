package rangestore

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// killChildAt re-executes the test binary to run only the test named run,
// with env set, waits for the child to print the line ready, and kills it
// with SIGKILL.
func killChildAt(t *testing.T, run, ready string, env ...string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+run+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if sc.Text() == ready {
			cmd.Process.Signal(syscall.SIGKILL)
			cmd.Wait()
			return
		}
	}
	cmd.Wait()
	t.Fatalf("child ended without saying %q:\n%s", ready, stderr.Bytes())
}

// childFail ends a child process with its error on stderr, for the parent
// to show.
func childFail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "child: "+format+"\n", args...)
	os.Exit(2)
}

const lruChildEnv = "RANGESTORE_LRU_CHILD"

// Objects used hours apart keep their order of eviction through a kill -9:
// uses recorded by the snapshot that reads alone make due, and creations
// and commits recorded in the journal since.
func TestKill9KeepsEvictionOrder(t *testing.T) {
	if dir := os.Getenv(lruChildEnv); dir != "" {
		lruChild(dir)
		return
	}
	dir := t.TempDir()
	killChildAt(t, "TestKill9KeepsEvictionOrder", "ready", lruChildEnv+"="+dir)

	s := openStore(t, dir, Options{MaxSize: 7 * testBS})
	defer s.Close()
	if r := s.Recovery(); r.Clean || r.Records == 0 {
		t.Errorf("recovery after kill -9: %v", r)
	}
	// Least recently used first: o1..o2 by the reads the snapshot
	// recorded, then o5 created and o3 written after it.
	order := []string{"o1", "o4", "o0", "o2", "o5", "o3"}
	for n := range order {
		o := create(t, s, fmt.Sprint("new", n), metaV(testBS, 1))
		writeBlock(t, o, 0, 0)
		o.Close()
		// List, unlike Get, does not count as a use.
		var left []string
		for _, info := range s.List() {
			if !strings.HasPrefix(info.Key, "new") {
				left = append(left, info.Key)
			}
		}
		want := append([]string(nil), order[n+1:]...)
		sort.Strings(want)
		if fmt.Sprint(left) != fmt.Sprint(want) {
			t.Fatalf("after writing %d new objects, %v are left; want %v, by the order of eviction %v", n+1, left, want, order)
		}
	}
}

// lruChild uses objects at chosen times of a fake clock, lets a snapshot
// record them as the snapshot loop would, writes more to the journal, and
// waits to be killed.
func lruChild(dir string) {
	s, err := Open(dir, Options{BlockSize: testBS, SnapshotInterval: time.Hour})
	if err != nil {
		childFail("%v", err)
	}
	base := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	var at int64
	s.mu.Lock()
	s.now = func() int64 { return at }
	s.mu.Unlock()
	hour := func(h float64) { at = base + int64(h*float64(time.Hour)) }
	write := func(key string, i int) {
		o, err := s.Create(key, metaV(2*testBS, 1))
		if err == nil {
			err = tryWriteBlock(o, i, 0)
			o.Close()
		}
		if err != nil {
			childFail("%s block %d: %v", key, i, err)
		}
	}
	for i := range 5 {
		hour(float64(i))
		write(fmt.Sprint("o", i), 0)
	}
	s.snapshotIfDue()
	// Reads alone: nothing is journalled, yet a snapshot is due.
	for _, use := range []struct {
		key  string
		hour float64
	}{{"o3", 10}, {"o1", 11}, {"o4", 12}, {"o0", 13}, {"o2", 14}} {
		hour(use.hour)
		o, err := s.Get(use.key)
		if err != nil {
			childFail("%v", err)
		}
		o.Close()
	}
	s.snapshotIfDue()
	// In the journal only.
	hour(15)
	write("o5", 0)
	hour(15.5)
	write("o3", 1)
	fmt.Println("ready")
	select {}
}
