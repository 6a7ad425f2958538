package rangestore

import (
	"os"
	"strings"
	"testing"
	"time"
)

func TestRecoveryAfterCleanCloseChecksNothing(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	if r := s.Recovery(); !r.Clean || r.Objects != 0 || r.Records != 0 || r.BlocksChecked != 0 {
		t.Errorf("a new store: %+v", r)
	}
	for _, key := range []string{"a", "b", "c"} {
		o := create(t, s, key, metaV(2*testBS, 1))
		writeBlock(t, o, 0, 0)
		writeBlock(t, o, 1, 0)
		o.Close()
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, Options{})
	defer s.Close()
	r := s.Recovery()
	want := RecoveryStats{Clean: true, Objects: 3, Duration: r.Duration}
	if r != want {
		t.Errorf("after a clean Close: %+v, want %+v", r, want)
	}
	if line := r.String(); strings.Contains(line, "\n") || !strings.Contains(line, "clean shutdown: 3 objects") {
		t.Errorf("String = %q", line)
	}
}

// A crash child killed mid-fill leaves a journal to replay and blocks to
// check; the blocks whose bytes the parent then garbles, as if they never
// reached the disk, are exactly those recovery drops and counts.
func TestRecoveryAfterKill9CountsWhatItDropped(t *testing.T) {
	dir := t.TempDir()
	// No snapshot while the child runs: every commit is in the journal,
	// so every committed block is checked.
	want := killCrashChild(t, dir, "", time.Hour, 30, 7)
	var torn []blockAt
	for key, v := range want {
		for i := range v.blocks {
			if len(torn) < 3 {
				torn = append(torn, blockAt{key, v.gen, i})
				delete(v.blocks, i)
			}
		}
	}
	if len(torn) < 3 {
		t.Fatalf("the child reported only %v", want)
	}
	path := func(gen uint64) string { return (&Store{dir: dir}).dataPath(gen) }
	for _, b := range torn {
		f, err := os.OpenFile(path(b.gen), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte("torn"), int64(b.i)*testBS+100)
		f.Close()
	}

	s := openStore(t, dir, Options{})
	defer s.Close()
	r := s.Recovery()
	t.Log(r)
	committed := 0
	for _, v := range want {
		committed += len(v.blocks)
	}
	if r.Clean || r.Records < committed+len(torn) || r.BlocksChecked < committed+len(torn) || r.Objects != len(s.List()) {
		t.Errorf("after kill -9 with %d blocks reported committed: %+v", committed+len(torn), r)
	}
	if r.BlocksDropped != len(torn) {
		t.Errorf("BlocksDropped = %d, garbled %d", r.BlocksDropped, len(torn))
	}
	for _, b := range torn {
		if o, err := s.Get(b.key); err == nil {
			if o.ID() == b.gen && o.HasBlock(b.i) {
				t.Errorf("%s block %d garbled but present", b.key, b.i)
			}
			o.Close()
		}
	}
	checkCrashed(t, s, want)
}

type blockAt struct {
	key string
	gen uint64
	i   int
}

func TestBackgroundSnapshotPanicIsLoggedAndTheStoreGoesOn(t *testing.T) {
	logged := make(chan string, 4)
	dir := t.TempDir()
	s := openStore(t, dir, Options{SnapshotInterval: time.Hour, Log: func(m string) { logged <- m }})
	o := create(t, s, "a", metaV(testBS, 1))
	writeBlock(t, o, 0, 0)
	o.Close()

	testHookSnapshot = func(step string) {
		if step == "journal-swapped" {
			panic("boom")
		}
	}
	s.kick <- struct{}{}
	var msg string
	select {
	case msg = <-logged:
	case <-time.After(20 * time.Second):
		t.Fatal("a panicking background snapshot logged nothing")
	}
	testHookSnapshot = nil
	if !strings.Contains(msg, "panic") || !strings.Contains(msg, "boom") || !strings.Contains(msg, "snapshot") {
		t.Errorf("logged %q", msg)
	}

	// The store goes on: writes work and survive a clean reopen.
	b := create(t, s, "b", metaV(testBS, 2))
	writeBlock(t, b, 0, 0)
	b.Close()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, Options{})
	defer s.Close()
	for _, k := range []string{"a", "b"} {
		obj, err := s.Get(k)
		if err != nil || !obj.HasBlock(0) {
			t.Fatalf("%s after the panic and a reopen: %v", k, err)
		}
		checkObject(t, obj)
		obj.Close()
	}
}
