package rangestore

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

// openDataFiles counts this process's descriptors on the store's data files.
func openDataFiles(t *testing.T, s *Store) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && strings.HasPrefix(target, s.dir+"/data/") {
			n++
		}
	}
	return n
}

func TestIdleDescriptorsStayOpenUpToTheBound(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{BlockSize: MinBlockSize})
	const objects = maxIdleFiles + 44
	for i := 0; i < objects; i++ {
		o := create(t, s, fmt.Sprint("k", i), metaV(100, 1))
		writeBlock(t, o, 0, 100)
		checkObject(t, o) // reads through the shared descriptor
		o.Close()
	}
	if n := openDataFiles(t, s); n != maxIdleFiles {
		t.Fatalf("%d data descriptors open after reading %d objects, want the bound %d", n, objects, maxIdleFiles)
	}
	// An idle object that is invalidated loses its descriptor and its file.
	o, err := s.Get(fmt.Sprint("k", objects-1))
	if err != nil {
		t.Fatal(err)
	}
	checkObject(t, o)
	o.Close()
	path := s.dataPath(o.ID())
	s.Invalidate(o.Key())
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("invalidated idle object's data file still there: %v", err)
	}
	if n := openDataFiles(t, s); n != maxIdleFiles-1 {
		t.Fatalf("%d data descriptors open after invalidating an idle one, want %d", n, maxIdleFiles-1)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if n := openDataFiles(t, s); n != 0 {
		t.Fatalf("%d data descriptors open after Close", n)
	}
}

func TestKeepBytesSurviveAbort(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{BlockSize: MinBlockSize})
	defer s.Close()
	o := create(t, s, "k", metaV(MinBlockSize, 1))
	defer o.Close()
	want := content(seedOf("k", `"v1"`), 0, 1000)
	for _, keep := range []bool{true, false} {
		w, err := o.WriteBlock(0)
		if err != nil {
			t.Fatal(err)
		}
		if keep {
			w.KeepBytes()
		}
		if _, err := w.Write(want); err != nil {
			t.Fatal(err)
		}
		w.Abort()
		f, err := o.Open()
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		f.ReadAt(got, 0)
		f.Close()
		if kept := string(got) == string(want); kept != keep {
			t.Errorf("KeepBytes %v: bytes still readable after Abort = %v", keep, kept)
		}
		if o.HasBlock(0) {
			t.Fatal("an aborted block is present")
		}
	}
}

func TestTransientObjectIsNeverKept(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{BlockSize: MinBlockSize})
	m := metaV(2*MinBlockSize, 1)
	o, err := s.CreateTransient(m)
	if err != nil {
		t.Fatal(err)
	}
	reader := o.Dup()
	writeBlock(t, o, 0, 0)
	writeBlock(t, o, 1, 1000)
	o.Close()
	// It is in no index: using it makes no snapshot due.
	s.mu.Lock()
	dirty := s.accessDirty
	s.mu.Unlock()
	if dirty {
		t.Error("using a transient object made a snapshot of the index due")
	}
	// Its holder reads every byte, while it stays out of every listing.
	checkObject(t, reader)
	if st := s.Stats(); st.Objects != 0 || st.BytesPresent != 2*MinBlockSize {
		t.Errorf("while held: %d objects, %d bytes present; want 0 and the two blocks counted", st.Objects, st.BytesPresent)
	}
	if _, err := s.Get(""); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get found a transient object: %v", err)
	}
	reader.Close()
	if st := s.Stats(); st.BytesPresent != 0 {
		t.Errorf("after the last close: %d bytes present", st.BytesPresent)
	}
	if files := dataFiles(t, dir); len(files) != 0 {
		t.Errorf("data files left: %v", files)
	}
	// Nothing of it comes back after a crash.
	o2, _ := s.CreateTransient(m)
	writeBlock(t, o2, 0, 0)
	s.crash()
	s2 := openStore(t, dir, Options{BlockSize: MinBlockSize})
	defer s2.Close()
	if st := s2.Stats(); st.Objects != 0 || st.BytesPresent != 0 {
		t.Errorf("after a crash: %d objects, %d bytes", st.Objects, st.BytesPresent)
	}
	if files := dataFiles(t, dir); len(files) != 0 {
		t.Errorf("data files left after a crash and reopen: %v", files)
	}
}
