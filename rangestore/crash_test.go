package rangestore

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestCrashRecoveryReplaysJournal(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	o := create(t, s, "snap", metaV(2*testBS, 1))
	writeBlock(t, o, 0, 0)
	o.Close()
	if err := s.snapshot(false); err != nil {
		t.Fatal(err)
	}
	// After the snapshot: a block, a new object, an invalidation and a
	// recreation, all only in the journal.
	o, _ = s.Get("snap")
	writeBlock(t, o, 1, 0)
	o.Close()
	n := create(t, s, "new", metaV(testBS+1, 1))
	writeBlock(t, n, 1, 0)
	n.Close()
	g := create(t, s, "gone", metaV(testBS, 1))
	writeBlock(t, g, 0, 0)
	g.Close()
	s.Invalidate("gone")
	r := create(t, s, "re", metaV(testBS, 1))
	writeBlock(t, r, 0, 0)
	r.Close()
	s.Invalidate("re")
	r = create(t, s, "re", metaV(2*testBS, 2))
	writeBlock(t, r, 1, 0)
	r.Close()
	want := presence(t, s)
	s.crash()

	s = openStore(t, dir, Options{})
	defer s.Close()
	if got := presence(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after crash recovery:\n got %v\nwant %v", got, want)
	}
	checkStore(t, s)
	if files := dataFiles(t, dir); len(files) != 3 {
		t.Errorf("data files after recovery = %v, want those of snap, new and re", files)
	}
}

func TestReplayLaterBlockRecordWins(t *testing.T) {
	// A block committed, dropped by recovery as corrupt, and written again
	// before any snapshot (one could not be written) has two records; the
	// later one describes its bytes.
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	o := create(t, s, "k", metaV(testBS, 1))
	writeBlock(t, o, 0, 0)
	gen, path := o.e.gen, s.dataPath(o.e.gen)
	o.Close()
	s.crash()
	other := content(12345, 0, testBS)
	if err := os.WriteFile(path, other, 0o644); err != nil {
		t.Fatal(err)
	}
	var e encoder
	e.byte(recBlock)
	e.uint(gen)
	e.uint(0)
	e.u32(crc32.Checksum(other, castagnoli))
	appendFile(t, journalOf(t, dir), frame(nil, e.b))

	s = openStore(t, dir, Options{})
	defer s.Close()
	o, err := s.Get("k")
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	p := make([]byte, testBS)
	if _, err := o.ReadAt(p, 0); err != nil || !bytes.Equal(p, other) {
		t.Errorf("block with a second record: %v", err)
	}
}

// Data is synced one snapshot late, so a crash may lose blocks committed
// before the last snapshot as well as after it; Open verifies exactly those,
// and trusts blocks synced by a later snapshot or by Close without reading
// them (what keeps Open cheap).
func TestOpenVerifiesOnlyUnsyncedBlocks(t *testing.T) {
	corrupt := func(t *testing.T, path string, off int64) {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt([]byte("garbage"), off+10)
		f.Close()
	}
	for _, tc := range []struct {
		name      string
		snapshots int  // after writing block 0
		clean     bool // Close instead of a crash
		present   bool // block 0 after corrupting it and reopening
	}{
		{"journal only", 0, false, false},
		{"listed unsynced by the last snapshot", 1, false, false},
		{"synced by the next snapshot", 2, false, true},
		{"synced by Close", 0, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir, Options{})
			o := create(t, s, "k", metaV(2*testBS, 1))
			writeBlock(t, o, 0, 0)
			path := s.dataPath(o.e.gen)
			o.Close()
			for range tc.snapshots {
				if err := s.snapshot(false); err != nil {
					t.Fatal(err)
				}
			}
			if tc.clean {
				s.Close()
			} else {
				s.crash()
			}
			corrupt(t, path, 0)
			s = openStore(t, dir, Options{})
			defer s.Close()
			o, err := s.Get("k")
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			if o.HasBlock(0) != tc.present {
				t.Errorf("block 0 present = %v, want %v", o.HasBlock(0), tc.present)
			}
		})
	}
}

// journalOf returns the path of the store's current journal.
func journalOf(t *testing.T, dir string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "journal-*"))
	if len(m) != 1 {
		t.Fatalf("journals: %v", m)
	}
	return m[0]
}

func appendFile(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

func TestTornJournalTailIgnored(t *testing.T) {
	// A record cut short, garbage, and a whole record with a bad checksum.
	full := frame(nil, []byte{recDelete, 1})
	bad := append([]byte(nil), full...)
	bad[len(bad)-1] ^= 0xff
	for _, tc := range []struct {
		name string
		tail []byte
	}{
		{"cut record", full[:len(full)-1]},
		{"cut header", full[:5]},
		{"bad checksum", bad},
		{"huge length", []byte{0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, onlyTorn := range []bool{false, true} {
				dir := t.TempDir()
				s := openStore(t, dir, Options{})
				o := create(t, s, "k", metaV(4*testBS, 1))
				writeBlock(t, o, 0, 0)
				if onlyTorn {
					// The journal holds nothing but the torn record.
					s.snapshot(false)
				} else {
					writeBlock(t, o, 1, 0)
				}
				o.Close()
				want := presence(t, s)
				s.crash()
				// The torn record would have deleted generation 1,
				// had it been whole.
				appendFile(t, journalOf(t, dir), tc.tail)

				s = openStore(t, dir, Options{})
				if got := presence(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
					t.Fatalf("onlyTorn=%v: after a torn tail %v, want %v", onlyTorn, got, want)
				}
				// Records appended after recovery must not be stranded
				// behind the torn one.
				o, _ = s.Get("k")
				writeBlock(t, o, 3, 0)
				o.Close()
				want = presence(t, s)
				s.crash()
				s = openStore(t, dir, Options{})
				if got := presence(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("onlyTorn=%v: commits after recovering a torn tail lost: %v, want %v", onlyTorn, got, want)
				}
				checkStore(t, s)
				s.Close()
			}
		})
	}
}

func TestCorruptTailBlockDroppedOnReopen(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	o := create(t, s, "k", metaV(4*testBS+10, 1))
	writeBlock(t, o, 0, 0)
	s.snapshot(false)
	// Committed after the last snapshot: verified on recovery.
	for _, i := range []int{1, 2, 4} {
		writeBlock(t, o, i, 0)
	}
	path := s.dataPath(o.e.gen)
	o.Close()
	s.crash()

	// As if the crash lost part of block 2's bytes and all of block 4's.
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0xde, 0xad}, 2*testBS+100)
	f.WriteAt(make([]byte, 10), 4*testBS)
	f.Close()

	s = openStore(t, dir, Options{})
	defer s.Close()
	o, err = s.Get("k")
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	for i, want := range []bool{true, true, false, false, false} {
		if o.HasBlock(i) != want {
			t.Errorf("block %d present = %v, want %v", i, o.HasBlock(i), want)
		}
	}
	checkObject(t, o)
	if st := s.Stats(); st.BytesPresent != 2*testBS {
		t.Errorf("BytesPresent = %d, want %d", st.BytesPresent, 2*testBS)
	}
	// The dropped blocks can be written again.
	writeBlock(t, o, 2, 0)
	writeBlock(t, o, 4, 0)
	checkObject(t, o)
}

// The crash test runs a child copy of the test binary that writes blocks
// until it is killed with SIGKILL, at a random moment or at a chosen step of
// a snapshot, then recovers the store and checks it.
const crashChildEnv = "RANGESTORE_CRASH_CHILD"

// Child protocol, one line each on stdout:
//
//	ok <key> <etag> <block> <gen>   after a block's Commit returned
//	inv <key>                 before invalidating key
//	snap <step>               at the chosen snapshot step; the child then stops
const (
	crashObjects = 6
	crashBlocks  = 12
)

func crashLength(v int) int64 { return crashBlocks*testBS - 1000 + int64(v%7) }

func TestCrashKill9NeverExposesTornBlocks(t *testing.T) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir)
		return
	}
	kills := 60
	if testing.Short() {
		kills = 12
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	dir := t.TempDir()
	steps := []string{"journal-swapped", "data-synced", "index-renamed"}
	for k := range kills {
		// A third of the kills stop the child inside a snapshot, the rest
		// at a random commit, half of them with snapshots running every
		// millisecond so those kills land in all the other places.
		var step string
		interval := time.Minute
		switch k % 6 {
		case 0, 3:
			step = steps[(k/3)%len(steps)]
			interval = time.Millisecond
		case 1, 4:
			interval = time.Millisecond
		}
		lines := 1 + rng.IntN(150)
		runCrashChild(t, dir, step, interval, lines, rng.Uint64())
		if t.Failed() {
			t.Fatalf("after kill %d (seed %d)", k, seed)
		}
	}
}

// runCrashChild starts a child on dir, kills it after lines commits (or at
// the snapshot step), and checks the recovered store against what the child
// reported.
func runCrashChild(t *testing.T, dir, step string, interval time.Duration, lines int, seed uint64) {
	t.Helper()
	want := killCrashChild(t, dir, step, interval, lines, seed)
	s, err := Open(dir, Options{BlockSize: testBS})
	if err != nil {
		t.Fatalf("reopen after kill: %v", err)
	}
	defer s.Close()
	checkCrashed(t, s, want)
}

// crashVersion is what a crash child reported committed of one key: its
// version, generation and blocks.
type crashVersion struct {
	etag   string
	gen    uint64
	blocks map[int]bool
}

// killCrashChild starts a child on dir, kills it with SIGKILL after lines
// commits (or at the snapshot step), and returns what it reported
// committed.
func killCrashChild(t *testing.T, dir, step string, interval time.Duration, lines int, seed uint64) map[string]*crashVersion {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashKill9NeverExposesTornBlocks$", "-test.count=1")
	cmd.Env = append(os.Environ(),
		crashChildEnv+"="+dir,
		"RANGESTORE_CRASH_STEP="+step,
		"RANGESTORE_CRASH_INTERVAL="+interval.String(),
		"RANGESTORE_CRASH_SEED="+strconv.FormatUint(seed, 10))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}

	// want holds, per key, the version and blocks the child reported
	// committed; a key is forgotten when the child announces invalidating
	// it, as it may have done so before the kill.
	want := make(map[string]*crashVersion)
	apply := func(line string) {
		f := strings.Fields(line)
		switch {
		case len(f) == 5 && f[0] == "ok":
			i, _ := strconv.Atoi(f[3])
			gen, _ := strconv.ParseUint(f[4], 10, 64)
			v := want[f[1]]
			if v == nil || v.etag != f[2] {
				v = &crashVersion{etag: f[2], gen: gen, blocks: make(map[int]bool)}
				want[f[1]] = v
			}
			v.blocks[i] = true
		case len(f) == 2 && f[0] == "inv":
			delete(want, f[1])
		}
	}
	sc := bufio.NewScanner(out)
	commits, stopped := 0, false
	for sc.Scan() {
		line := sc.Text()
		apply(line)
		if strings.HasPrefix(line, "ok ") {
			commits++
		}
		if step == "" && commits >= lines || step != "" && line == "snap "+step {
			stopped = true
			break
		}
	}
	if !stopped {
		cmd.Wait()
		t.Fatalf("child ended before being killed: %v\n%s", sc.Err(), stderr.Bytes())
	}
	cmd.Process.Signal(syscall.SIGKILL)
	// What the child printed before it died counts too.
	for sc.Scan() {
		apply(sc.Text())
	}
	cmd.Wait()
	return want
}

// checkCrashed checks a store recovered after killing a crash child: every
// present byte is right, and every block the child reported committed is
// present.
func checkCrashed(t *testing.T, s *Store, want map[string]*crashVersion) {
	t.Helper()
	checkStore(t, s)
	for key, v := range want {
		o, err := s.Get(key)
		if err != nil {
			t.Errorf("%q: reported committed, then %v", key, err)
			continue
		}
		if o.Meta().ETag != v.etag {
			t.Errorf("%q: version %s, want %s", key, o.Meta().ETag, v.etag)
		}
		for i := range v.blocks {
			if !o.HasBlock(i) {
				t.Errorf("%q block %d: reported committed but missing", key, i)
			}
		}
		o.Close()
	}
}

// crashChild writes blocks of deterministic content to a few objects until
// killed, reporting each commit on stdout.
func crashChild(dir string) {
	interval, _ := time.ParseDuration(os.Getenv("RANGESTORE_CRASH_INTERVAL"))
	seed, _ := strconv.ParseUint(os.Getenv("RANGESTORE_CRASH_SEED"), 10, 64)
	rng := rand.New(rand.NewPCG(seed, 1))
	stdout := bufio.NewWriter(os.Stdout)
	var sayMu sync.Mutex // the snapshot hook says things too
	say := func(format string, args ...any) {
		sayMu.Lock()
		defer sayMu.Unlock()
		fmt.Fprintf(stdout, format+"\n", args...)
		if stdout.Flush() != nil {
			os.Exit(1) // the parent is gone
		}
	}
	die := func(err error) {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	var ready atomic.Bool
	if step := os.Getenv("RANGESTORE_CRASH_STEP"); step != "" {
		// Stop inside the first snapshot at that step once a few blocks
		// were committed, holding the snapshot lock, until the parent
		// kills us. Commits go on meanwhile, into the new journal.
		testHookSnapshot = func(s string) {
			if s == step && ready.Load() {
				say("snap %s", s)
				select {}
			}
		}
	}
	s, err := Open(dir, Options{BlockSize: testBS, SnapshotInterval: interval})
	if err != nil {
		die(err)
	}
	armAfter := 1 + rng.IntN(40)
	for n := 0; ; n++ {
		if n == armAfter {
			ready.Store(true)
		}
		key := "obj" + strconv.Itoa(rng.IntN(crashObjects))
		o, err := s.Get(key)
		if errors.Is(err, ErrNotFound) {
			v := rng.IntN(1000)
			o, err = s.Create(key, metaV(crashLength(v), v))
		}
		if err != nil {
			die(err)
		}
		missing := o.Missing(0, o.Size())
		if len(missing) == 0 || rng.IntN(40) == 0 {
			o.Close()
			say("inv %s", key)
			s.Invalidate(key)
			continue
		}
		sp := missing[rng.IntN(len(missing))]
		i := o.BlockOf(sp.Off) + rng.IntN(int((sp.Len+testBS-1)/testBS))
		piece := []int{0, 4096, 10000}[rng.IntN(3)]
		if err := tryWriteBlock(o, i, piece); err != nil {
			die(err)
		}
		say("ok %s %s %d %d", key, o.Meta().ETag, i, o.ID())
		o.Close()
	}
}

// An index written before the list of unsynced blocks was added to it
// still opens.
func TestIndexWithoutUnsyncedListOpens(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	o := create(t, s, "k", metaV(2*testBS, 1))
	writeBlock(t, o, 1, 0)
	o.Close()
	s.Close()

	s = openStore(t, dir, Options{})
	s.snapMu.Lock()
	s.mu.Lock()
	s.captureIndex()
	s.mu.Unlock()
	body := append([]byte(nil), s.encodeIndex(s.seq, nil)...)
	s.snapMu.Unlock()
	s.Close()
	body = body[:len(body)-1] // the empty list's count
	if err := os.WriteFile(filepath.Join(dir, "index"), compressIndex(body), 0o644); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, Options{})
	defer s.Close()
	if p := presence(t, s); p["k"] != `"v1" .#` {
		t.Errorf("presence = %v", p)
	}
}
