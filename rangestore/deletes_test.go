package rangestore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

const fullDiskChildEnv = "RANGESTORE_FULL_DISK_CHILD"

// Objects removed while the file system is full, their delete records
// written on no free space, stay removed through a kill -9: an invalidated
// object still held open (whose data file must stay for its holder), an
// evicted object without data, and an evicted object with data.
func TestKill9OnFullDiskNeverBringsBackRemovedObjects(t *testing.T) {
	if dir := os.Getenv(fullDiskChildEnv); dir != "" {
		fullDiskChild(dir)
		return
	}
	dir := mountTmpfs(t, "1m")
	killChildAt(t, "TestKill9OnFullDiskNeverBringsBackRemovedObjects", "ready", fullDiskChildEnv+"="+dir)

	s := openStore(t, dir, Options{})
	defer s.Close()
	t.Log(s.Recovery())
	for _, key := range []string{"held", "empty", "old"} {
		if o, err := s.Get(key); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%q) of a removed object after kill -9: %v", key, err)
			if err == nil {
				t.Logf("%q came back with blocks %v missing", key, o.Missing(0, o.Size()))
				o.Close()
			}
		}
	}
	checkStore(t, s)
}

// fullDiskChild fills the file system under a store, removes objects, and
// waits to be killed.
func fullDiskChild(dir string) {
	s, err := Open(dir, Options{BlockSize: testBS, SnapshotInterval: time.Hour})
	if err != nil {
		childFail("%v", err)
	}
	put := func(key string, blocks int) *Object {
		o, err := s.Create(key, metaV(2*testBS, 1))
		for i := 0; i < blocks && err == nil; i++ {
			err = tryWriteBlock(o, i, 0)
		}
		if err != nil {
			childFail("%s: %v", key, err)
		}
		return o
	}
	put("empty", 0).Close()
	put("old", 2).Close()
	held := put("held", 2)
	if err := s.snapshot(false); err != nil {
		childFail("snapshot: %v", err)
	}

	filler, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		childFail("%v", err)
	}
	for {
		if _, err := filler.Write(make([]byte, 4096)); err != nil {
			break
		}
	}
	if !s.Invalidate("held") {
		childFail("held was not stored")
	}
	// Records of new objects make room by evicting empty, then old.
	for n := 0; s.Stats().Evictions < 2; n++ {
		o, err := s.Create(fmt.Sprintf("new-%03d", n), metaV(1, n))
		if err != nil {
			childFail("Create %d on a full disk: %v", n, err)
		}
		o.Close()
		if n == 10000 {
			childFail("nothing evicted")
		}
	}
	checkHeld := make([]byte, testBS)
	if _, err := held.ReadAt(checkHeld, 0); err != nil {
		childFail("the holder of an invalidated object cannot read it: %v", err)
	}
	fmt.Println("ready")
	select {}
}

// An object whose data file is gone was removed by a process that crashed
// before its delete record reached the journal: Open forgets it rather
// than bring it back empty under its old identity.
func TestOpenForgetsObjectsWhoseDataFileIsGone(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	for _, key := range []string{"gone", "kept", "empty"} {
		o := create(t, s, key, metaV(2*testBS, 1))
		if key != "empty" {
			writeBlock(t, o, 0, 0)
		}
		o.Close()
	}
	o, _ := s.Get("gone")
	path := s.dataPath(o.ID())
	o.Close()
	s.snapshot(false)
	s.crash()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, Options{})
	defer s.Close()
	if _, err := s.Get("gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of an object whose data file is gone: %v", err)
	}
	if p := presence(t, s); fmt.Sprint(p) != `map[empty:"v1" .. kept:"v1" #.]` {
		t.Errorf("presence = %v", p)
	}
	if r := s.Recovery(); r.ObjectsDropped != 1 {
		t.Errorf("Recovery = %v, want one object dropped", r)
	}
}
