package rangestore

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
)

// checkBudget checks MaxSize holds, both in the store's accounting and in
// the disk blocks its data files really take.
func checkBudget(t *testing.T, s *Store) {
	t.Helper()
	st := s.Stats()
	if st.BytesPresent+st.BytesWriting > st.MaxSize {
		t.Fatalf("over budget: %d present + %d being written > max %d", st.BytesPresent, st.BytesWriting, st.MaxSize)
	}
	if a := allocated(t, s.Dir()); a > st.MaxSize+st.BytesWriting {
		t.Fatalf("data files take %d bytes on disk, max %d + %d being written", a, st.MaxSize, st.BytesWriting)
	}
}

func TestMaxSizeNeverExceeded(t *testing.T) {
	const max = 8 * testBS
	s := openStore(t, t.TempDir(), Options{MaxSize: max})
	defer s.Close()
	for n := range 20 {
		o := create(t, s, fmt.Sprint("k", n), metaV(3*testBS, n))
		for i := range 3 {
			w, err := o.WriteBlock(i)
			if err != nil {
				t.Fatal(err)
			}
			checkBudget(t, s) // with a block reserved and not yet written
			p := content(seedOf(o.Key(), o.Meta().ETag), o.Block(i).Off, testBS)
			w.Write(p[:testBS/2])
			checkBudget(t, s)
			w.Write(p[testBS/2:])
			if err := w.Commit(); err != nil {
				t.Fatal(err)
			}
			checkBudget(t, s)
		}
		o.Close()
	}
	st := s.Stats()
	if st.Evictions == 0 || st.BytesPresent > max || st.BytesPresent < max-3*testBS {
		t.Errorf("Stats after filling = %+v", st)
	}
	checkStore(t, s)

	// A block larger than the whole budget can never fit.
	big := openStore(t, t.TempDir(), Options{BlockSize: 1 << 20, MaxSize: 512 << 10})
	defer big.Close()
	o := create(t, big, "big", metaV(1<<20, 1))
	defer o.Close()
	if _, err := o.WriteBlock(0); !errors.Is(err, ErrNoSpace) {
		t.Errorf("block larger than MaxSize: %v", err)
	}
}

func TestEvictionFollowsLRU(t *testing.T) {
	const max = 3 * testBS
	s := openStore(t, t.TempDir(), Options{MaxSize: max})
	defer s.Close()
	put := func(key string) {
		t.Helper()
		o := create(t, s, key, metaV(testBS, 1))
		writeBlock(t, o, 0, 0)
		o.Close()
	}
	keys := func() string {
		var k []string
		for _, info := range s.List() {
			k = append(k, info.Key)
		}
		return strings.Join(k, " ")
	}
	put("a")
	put("b")
	put("c")
	// Reading a makes b the least recently used.
	if o, err := s.Get("a"); err != nil {
		t.Fatal(err)
	} else {
		o.Close()
	}
	for _, step := range []struct{ put, want string }{
		{"d", "a c d"},
		{"e", "a d e"},
		{"f", "d e f"},
	} {
		put(step.put)
		if got := keys(); got != step.want {
			t.Fatalf("after putting %s: objects %q, want %q", step.put, got, step.want)
		}
	}
	if st := s.Stats(); st.Evictions != 3 {
		t.Errorf("Evictions = %d, want 3", st.Evictions)
	}
	s.Close()

	// Recency survives a reopen: d is still the oldest.
	s = openStore(t, s.Dir(), Options{MaxSize: max})
	defer s.Close()
	put("g")
	if got := keys(); got != "e f g" {
		t.Errorf("after reopen and putting g: objects %q, want %q", got, "e f g")
	}
}

func TestHeldObjectsNeverEvicted(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{MaxSize: 2 * testBS})
	defer s.Close()
	a := create(t, s, "a", metaV(testBS, 1))
	writeBlock(t, a, 0, 0)
	b := create(t, s, "b", metaV(testBS, 1))
	writeBlock(t, b, 0, 0)
	c := create(t, s, "c", metaV(testBS, 1))
	if _, err := c.WriteBlock(0); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("write with every other object held: %v, want ErrNoSpace", err)
	}
	if !a.Valid() || !b.Valid() || s.Stats().Evictions != 0 {
		t.Fatal("a held object was evicted")
	}
	checkObject(t, a)

	// A block writer holds its object open too, even once the handle it
	// came from is closed.
	b.Close()
	d := create(t, s, "d", metaV(testBS, 1))
	w, err := c.WriteBlock(0) // evicts b
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := d.WriteBlock(0); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("write while a and c's writer hold the rest: %v, want ErrNoSpace", err)
	}
	w.Write(content(seedOf("c", `"v1"`), 0, testBS))
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit of a writer whose handle was closed: %v", err)
	}
	c, _ = s.Get("c")
	defer c.Close()
	checkObject(t, c)
	d.Close()
	if !a.Valid() || b.Valid() {
		t.Errorf("evicted the wrong object: a valid %v, b valid %v", a.Valid(), b.Valid())
	}
	checkObject(t, a)
	a.Close()
}

// mountTmpfs mounts a small tmpfs for tests of a full disk, skipping the
// test where that is not possible (not root, no mount namespace rights).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func TestFullDiskGivesErrNoSpaceAndRecovers(t *testing.T) {
	for _, tc := range []struct {
		bs     int64
		blocks int // per object
		piece  int
	}{
		{testBS, 8, 16 << 10},
		{1 << 20, 1, 1 << 20}, // whole-block writes, checksummed concurrently
	} {
		t.Run(fmt.Sprint(tc.bs), func(t *testing.T) { testFullDisk(t, tc.bs, tc.blocks, tc.piece) })
	}
}

func testFullDisk(t *testing.T, bs int64, blocks, piece int) {
	dir := mountTmpfs(t, "4m")
	s := openStore(t, dir, Options{BlockSize: bs}) // no budget: only the disk stops us
	var full error
	var fullKey string
	n := 0
	for ; n < 20 && full == nil; n++ {
		key := fmt.Sprint("k", n)
		o, err := s.Create(key, metaV(int64(blocks)*bs, n))
		if err != nil {
			full = err
			break
		}
		for i := 0; i < blocks && full == nil; i++ {
			if full = tryWriteBlock(o, i, piece); full != nil {
				fullKey = key
				if o.HasBlock(i) {
					t.Errorf("block %d of %s present after failing with %v", i, key, full)
				}
			}
		}
		o.Close()
	}
	if full == nil {
		t.Fatal("a 4 MiB file system never filled up")
	}
	if !errors.Is(full, ErrNoSpace) || !errors.Is(full, syscall.ENOSPC) {
		t.Fatalf("full disk error %v does not wrap ErrNoSpace and ENOSPC", full)
	}
	t.Logf("full after %d objects: %v", n, full)
	checkStore(t, s)

	// The failure evicted the oldest objects: the same write now works,
	// and the store goes on filling and evicting as it must.
	o, err := s.Get(fullKey)
	if err != nil {
		// Create itself hit the full disk.
		o = create(t, s, "retry", metaV(int64(blocks)*bs, 99))
	}
	if st := s.Stats(); st.Evictions == 0 {
		t.Errorf("no eviction after a full disk: %+v", st)
	}
	for i := 0; i < blocks; i++ {
		if !o.HasBlock(i) {
			writeBlock(t, o, i, 0)
		}
	}
	o.Close()
	for k := range 10 {
		key := fmt.Sprint("after", k)
		o, err := s.Create(key, metaV(int64(blocks)*bs, k))
		if err == nil {
			for i := 0; i < blocks && err == nil; i++ {
				if err = tryWriteBlock(o, i, 0); err == nil {
					continue
				}
				// The next attempt must succeed after the eviction.
				err = tryWriteBlock(o, i, 0)
			}
			o.Close()
		}
		if err != nil {
			t.Fatalf("store wedged after a full disk: %s: %v", key, err)
		}
	}
	checkStore(t, s)
	want := presence(t, s)
	if err := s.Close(); err != nil {
		t.Fatalf("Close on a full disk: %v", err)
	}
	s = openStore(t, dir, Options{BlockSize: bs})
	defer s.Close()
	if got := presence(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after reopen %v, want %v", got, want)
	}
	checkStore(t, s)
}

func TestMinFreeKeepsFreeSpace(t *testing.T) {
	const minFree = 2 << 20
	dir := mountTmpfs(t, "4m")
	s := openStore(t, dir, Options{MinFree: minFree})
	defer s.Close()
	free := func() int64 {
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Bavail) * int64(st.Bsize)
	}
	// The journal and index take a page now and then besides the blocks.
	const slack = 16 << 10
	for n := range 12 {
		o := create(t, s, fmt.Sprint("k", n), metaV(4*testBS, n))
		for i := range 4 {
			writeBlock(t, o, i, 0)
			if f := free(); f < minFree-slack {
				t.Fatalf("object %d block %d: %d bytes free, MinFree %d", n, i, f, minFree)
			}
		}
		o.Close()
	}
	st := s.Stats()
	if st.Evictions == 0 {
		t.Errorf("12 objects of 256 KiB fit in 2 MiB without eviction: %+v", st)
	}
	checkStore(t, s)
}

func TestFullJournalEvictsAndRetries(t *testing.T) {
	dir := mountTmpfs(t, "1m")
	s := openStore(t, dir, Options{})
	defer s.Close()
	old := create(t, s, "old", metaV(2*testBS, 1))
	writeBlock(t, old, 0, 0)
	writeBlock(t, old, 1, 0)
	old.Close()

	// Fill the file system to the last byte.
	filler, err := os.Create(dir + "/filler")
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()
	for {
		if _, err := filler.Write(make([]byte, 4096)); err != nil {
			break
		}
	}
	// Journal records soon need more space than the journal has allocated
	// (its reserve for delete records, deleteReserve, is not theirs to
	// use); the store makes room by evicting instead of failing.
	for n := range 1000 {
		o, err := s.Create(fmt.Sprintf("new-%03d-%s", n, strings.Repeat("x", 40)), metaV(1, n))
		if err != nil {
			t.Fatalf("Create %d on a full disk with something to evict: %v", n, err)
		}
		o.Close()
	}
	if st := s.Stats(); st.Evictions == 0 {
		t.Fatalf("1000 records fit in a full file system: %+v", st)
	}
	if _, err := s.Get("old"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the least recently used object was not the one evicted: %v", err)
	}
	// Fill the room the eviction made; with nothing worth evicting the
	// error says so.
	for {
		if _, err := filler.Write(make([]byte, 4096)); err != nil {
			break
		}
	}
	var last error
	for n := range 1000 {
		o, err := s.Create(fmt.Sprintf("more-%03d-%s", n, strings.Repeat("y", 40)), metaV(1, n))
		if err != nil {
			last = err
			break
		}
		defer o.Close() // held: not evictable
	}
	if !errors.Is(last, ErrNoSpace) {
		t.Errorf("Create on a full disk with nothing evictable: %v, want ErrNoSpace", last)
	}
	// The store opens again on the full disk, replaying its journal.
	// Objects evicted while no delete record fitted may come back, but
	// only without their blocks.
	want := presence(t, s)
	s.crash()
	s = openStore(t, dir, Options{})
	defer s.Close()
	got := presence(t, s)
	if _, ok := got["old"]; ok {
		// Its data went first, making room for its delete record.
		t.Error("the object evicted to make room came back")
	}
	for k, p := range want {
		if got[k] != p {
			t.Errorf("%s after reopen on a full disk: %q, want %q", k, got[k], p)
		}
	}
	for k, p := range got {
		if _, ok := want[k]; !ok && strings.Contains(p, "#") {
			t.Errorf("evicted object %s came back with blocks: %q", k, p)
		}
	}
	checkStore(t, s)
}

func TestShortWriteOnFullDiskCanBeResumed(t *testing.T) {
	const bs = 1 << 20
	dir := mountTmpfs(t, "4m")
	s := openStore(t, dir, Options{BlockSize: bs})
	old := create(t, s, "old", metaV(2*bs, 1))
	writeBlock(t, old, 0, 0)
	writeBlock(t, old, 1, 0)
	old.Close()

	// Leave half a block free.
	filler, err := os.Create(dir + "/filler")
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()
	var size int64
	for {
		n, err := filler.Write(make([]byte, 4096))
		size += int64(n)
		if err != nil {
			break
		}
	}
	if err := filler.Truncate(size - bs/2); err != nil {
		t.Fatal(err)
	}

	o := create(t, s, "new", metaV(bs, 1))
	w, err := o.WriteBlock(0)
	if err != nil {
		t.Fatal(err)
	}
	p := content(seedOf("new", `"v1"`), 0, bs)
	// os.File reports a failed short write as writing nothing, though
	// half the block is on disk; either way n is what the checksum covers.
	n, err := w.Write(p)
	if !errors.Is(err, ErrNoSpace) || n == bs || w.Written() != int64(n) {
		t.Fatalf("Write of a block into half a block of space = %d, %v", n, err)
	}
	// The failed write evicted "old"; the rest of the block now fits, and
	// the checksum covers exactly what was written.
	if _, err := w.Write(p[n:]); err != nil {
		t.Fatalf("resuming the write after eviction: %v", err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	o.Close()
	s.crash()
	s = openStore(t, dir, Options{BlockSize: bs})
	defer s.Close()
	o, err = s.Get("new")
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if !o.HasBlock(0) {
		t.Fatal("resumed block failed verification after a crash")
	}
	checkObject(t, o)
}

func TestAbortAfterFullDiskFreesTheWholeBlock(t *testing.T) {
	const bs = 1 << 20
	dir := mountTmpfs(t, "4m")
	free := func() int64 {
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		return int64(st.Bavail) * int64(st.Bsize)
	}
	s := openStore(t, dir, Options{BlockSize: bs})
	defer s.Close()
	filler, err := os.Create(dir + "/filler")
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()
	filler.Write(make([]byte, 3*bs+bs/2)) // half a block left
	before := free()
	o := create(t, s, "k", metaV(bs, 1))
	defer o.Close()
	w, err := o.WriteBlock(0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(make([]byte, bs)); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Write into half a block of space: %v", err)
	}
	w.Abort()
	// The journal may have taken a page for the create record.
	if after := free(); after < before-8<<10 {
		t.Errorf("%d bytes free after the aborted block, %d before", after, before)
	}
}
