package rangestore

import (
	"container/list"
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Block size limits and default.
const (
	MinBlockSize     = 64 << 10
	MaxBlockSize     = 64 << 20
	DefaultBlockSize = 1 << 20
)

// Errors the caller can recognise with errors.Is.
var (
	ErrNotFound         = errors.New("rangestore: object not found")
	ErrIdentityMismatch = errors.New("rangestore: object identity differs from the stored version")
	ErrBlockPresent     = errors.New("rangestore: block already present")
	ErrBlockBusy        = errors.New("rangestore: block is being written by another writer")
	ErrNotPresent       = errors.New("rangestore: range not present")
	ErrNoSpace          = errors.New("rangestore: no space left within the disk budget")
	ErrGone             = errors.New("rangestore: object was invalidated")
	ErrShortBlock       = errors.New("rangestore: block not completely written")
	ErrClosed           = errors.New("rangestore: store closed")
	ErrTooLarge         = errors.New("rangestore: object larger than the store's limit")
)

// Object size limits. An object's presence bitmap takes Length/BlockSize/8
// bytes of memory from its creation (its checksums take memory only as its
// blocks arrive), so the limit bounds what one Create can allocate: at the
// default limit and the smallest block size, 2 MiB.
const (
	DefaultMaxObjectSize = 1 << 40 // 1 TiB
	MaxMaxObjectSize     = 1 << 50 // 1 PiB, so block counts and offsets never overflow
)

// Options configure a Store. The zero value is usable.
type Options struct {
	// BlockSize is the size of a block: a power of two between 64 KiB and
	// 64 MiB, fixed for a directory once written. Default: 1 MiB.
	BlockSize int64

	// MaxSize caps the bytes of present blocks. Zero means no cap.
	MaxSize int64

	// MinFree is the free space to keep on the file system. Zero means none.
	MinFree int64

	// MaxObjectSize is the largest object Length that Create and
	// CreateTransient accept; larger ones fail with ErrTooLarge. Objects
	// stored under a larger limit before stay. At most MaxMaxObjectSize.
	// Default: DefaultMaxObjectSize (1 TiB).
	MaxObjectSize int64

	// SnapshotInterval is how often the index is snapshotted (and the
	// journal truncated) while anything changed, including objects read
	// a minute or more after their last recorded use: the index keeps each
	// object's last use, so the order of eviction survives a crash to
	// within about this interval. Default: 1 minute.
	SnapshotInterval time.Duration

	// Log, when set, receives what the store's own goroutine cannot
	// return to anyone: a failed background snapshot, or a panic in one
	// (with its stack; the store keeps running on its journal).
	Log func(msg string)
}

// Meta describes one version of an object. Length, ETag and LastModified
// are its identity; the rest is replayed to clients.
type Meta struct {
	Length       int64
	ETag         string
	LastModified string
	ContentType  string
	// Header holds further response headers to replay, keyed by canonical
	// name (the same shape as net/http's Header).
	Header map[string][]string
	// Internal holds the caller's own bookkeeping for the version (when it
	// arrived, say), kept with it and never replayed.
	Internal map[string]string
}

// SameIdentity reports whether m and o describe the same version: equal
// lengths and equal ETags, and, when there is no ETag to compare, equal
// Last-Modified dates.
func (m Meta) SameIdentity(o Meta) bool {
	if m.Length != o.Length || m.ETag != o.ETag {
		return false
	}
	return m.ETag != "" || m.LastModified == o.LastModified
}

// Span is a byte range [Off, Off+Len) of an object.
type Span struct {
	Off, Len int64
}

// ObjectInfo is one line of List.
type ObjectInfo struct {
	Key          string
	Size         int64
	BytesPresent int64
	LastAccess   time.Time
}

// Stats are the store's totals.
type Stats struct {
	Objects      int
	BytesPresent int64 // bytes of present blocks, plus those of invalidated objects still open
	BytesWriting int64 // bytes reserved by blocks being written
	MaxSize      int64
	MinFree      int64
	BlockSize    int64
	Evictions    int64 // objects evicted to keep to the budget since Open
}

// Store is an open store directory. It is safe for concurrent use.
type Store struct {
	dir       string
	blockSize int64
	shift     uint
	opts      Options
	lock      *os.File

	// snapMu serialises snapshots and guards what they reuse: the capture
	// of the index taken under s.mu, and ibuf, the buffer it is encoded
	// into after s.mu is released.
	snapMu  sync.Mutex
	capture indexCapture
	ibuf    []byte
	// snapHold is how long the last snapshot held s.mu, for the benchmark
	// that keeps it short. Guarded by snapMu.
	snapHold time.Duration

	mu         sync.Mutex
	objects    map[string]*entry
	lru        list.List // of *entry, most recently used at the front
	idle       list.List // of *entry nobody holds whose descriptor is open, newest first
	nextGen    uint64
	used       int64
	reserved   int64
	evictions  int64
	journal    *os.File
	jsize      int64       // bytes of whole records in journal
	jtorn      bool        // journal ends in a torn record that could not be cut off
	jalloc     int64       // bytes of journal allocated (see reserveJournal)
	noPrealloc atomic.Bool // the file system cannot preallocate (set by snapshots outside s.mu too)
	seq        uint64
	changes    int // journal records since the last snapshot
	// Blocks are synced to disk one snapshot late, so a snapshot rarely
	// waits for writeback (and never for data deleted meanwhile): recent
	// are the blocks committed since the last snapshot, unsynced those the
	// last snapshot lists as not yet synced. Open verifies both.
	recent   []blockRef
	unsynced []blockRef
	closing  bool // Close has begun; a second Close must not race it
	closed   bool
	noEvict  bool // appendRecord must not evict to make room (see remove)
	// accessDirty is set when an object is used accessGrain or more after
	// the last use the index or journal recorded for it; a snapshot is
	// then due even when nothing was journalled.
	accessDirty bool
	now         func() int64 // the clock, unix nanoseconds; tests replace it
	enc         encoder
	fbuf        []byte // framing buffer for appendRecord

	recovery RecoveryStats // what Open did; set before Open returns

	kick chan struct{}
	stop chan struct{}
	done chan struct{}
}

// entry is the in-memory state of one object generation.
type entry struct {
	key     string
	gen     uint64
	meta    Meta
	nblocks int
	present []atomic.Uint64 // bitmap, read without locks

	// Guarded by Store.mu.
	crc          checksums
	writing      map[int]struct{}
	presentBytes int64
	refs         int
	deleted      bool
	transient    bool // from CreateTransient: under no key, gone at last close
	hasFile      bool
	lastAccess   int64 // unix nanoseconds
	savedAccess  int64 // lastAccess as the index or journal last recorded it
	elem         *list.Element

	// file is a descriptor of the data file shared by readers and block
	// writers while refs > 0. It is loaded without locks on the read path;
	// rmu serialises opening and closing it.
	rmu  sync.Mutex
	idle *list.Element // in Store.idle; guarded by Store.mu
	file atomic.Pointer[os.File]
}

// blockRef names block i of e.
type blockRef struct {
	e *entry
	i int
}

// checksums holds the CRC-32C of each present block, in chunks allocated
// when a block of theirs is first committed: an object claiming a huge
// length costs nothing for blocks it never gets.
type checksums []*[crcChunk]uint32

const crcChunk = 1024

func (c checksums) get(i int) uint32 {
	if p := c[i/crcChunk]; p != nil {
		return p[i%crcChunk]
	}
	return 0
}

func (c checksums) set(i int, sum uint32) {
	p := &c[i/crcChunk]
	if *p == nil {
		*p = new([crcChunk]uint32)
	}
	(*p)[i%crcChunk] = sum
}

func (e *entry) has(i int) bool { return e.present[i>>6].Load()&(1<<(i&63)) != 0 }
func (e *entry) set(i int)      { e.present[i>>6].Or(1 << (i & 63)) }
func (e *entry) clear(i int)    { e.present[i>>6].And(^uint64(1 << (i & 63))) }

// Open opens the store in dir, creating it if needed. Blocks written after
// the last snapshot are verified against their checksums first.
func Open(dir string, opts Options) (*Store, error) {
	start := time.Now()
	if opts.BlockSize == 0 {
		opts.BlockSize = DefaultBlockSize
	}
	if opts.BlockSize < MinBlockSize || opts.BlockSize > MaxBlockSize || bits.OnesCount64(uint64(opts.BlockSize)) != 1 {
		return nil, fmt.Errorf("rangestore: block size %d is not a power of two between %d and %d", opts.BlockSize, MinBlockSize, MaxBlockSize)
	}
	if opts.MaxSize < 0 || opts.MinFree < 0 {
		return nil, fmt.Errorf("rangestore: negative MaxSize or MinFree")
	}
	if opts.SnapshotInterval <= 0 {
		opts.SnapshotInterval = time.Minute
	}
	if opts.MaxObjectSize == 0 {
		opts.MaxObjectSize = DefaultMaxObjectSize
	}
	if opts.MaxObjectSize < 0 || opts.MaxObjectSize > MaxMaxObjectSize {
		return nil, fmt.Errorf("rangestore: MaxObjectSize %d is not between 1 and %d", opts.MaxObjectSize, int64(MaxMaxObjectSize))
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return nil, fmt.Errorf("rangestore: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("rangestore: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("rangestore: %s is in use by another process: %w", dir, err)
	}
	s := &Store{
		dir:       dir,
		blockSize: opts.BlockSize,
		shift:     uint(bits.TrailingZeros64(uint64(opts.BlockSize))),
		opts:      opts,
		lock:      lock,
		objects:   make(map[string]*entry),
		now:       func() int64 { return time.Now().UnixNano() },
		kick:      make(chan struct{}, 1),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
	}
	if err := s.checkFormat(); err != nil {
		lock.Close()
		return nil, err
	}
	clean, known := s.markOpen()
	if err := s.recover(); err != nil {
		if s.journal != nil {
			s.journal.Close()
		}
		lock.Close()
		return nil, err
	}
	r := &s.recovery
	r.Clean = clean || !known && r.Records == 0 && r.BlocksChecked == 0 && !r.TornTail
	r.Objects = len(s.objects)
	r.Duration = time.Since(start)
	go s.snapshotLoop()
	return s, nil
}

// CheckFormat reports whether dir can be opened with blockSize, without
// opening or locking it: nil when dir holds no store yet or one with that
// block size. It lets a configuration be validated while another process has
// the store open.
func CheckFormat(dir string, blockSize int64) error {
	if blockSize == 0 {
		blockSize = DefaultBlockSize
	}
	got, err := readFormat(dir)
	if err != nil || got == 0 {
		return err
	}
	if got != blockSize {
		return blockSizeError(dir, got, blockSize)
	}
	return nil
}

const formatPrefix = "rangestore 1 block_size="

func readFormat(dir string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(dir, "FORMAT"))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("rangestore: %w", err)
	}
	s, ok := strings.CutPrefix(strings.TrimSpace(string(b)), formatPrefix)
	n, err := strconv.ParseInt(s, 10, 64)
	if !ok || err != nil {
		return 0, fmt.Errorf("rangestore: %s/FORMAT is not a rangestore format line: %q", dir, b)
	}
	return n, nil
}

func blockSizeError(dir string, have, want int64) error {
	return fmt.Errorf("rangestore: %s was created with block size %d, cannot open it with block size %d (use the old size or another directory)", dir, have, want)
}

func (s *Store) checkFormat() error {
	got, err := readFormat(s.dir)
	if err != nil {
		return err
	}
	if got == 0 {
		return WriteFileAtomic(filepath.Join(s.dir, "FORMAT"), fmt.Appendf(nil, "%s%d\n", formatPrefix, s.blockSize))
	}
	if got != s.blockSize {
		return blockSizeError(s.dir, got, s.blockSize)
	}
	return nil
}

// BlockSize returns the store's block size.
func (s *Store) BlockSize() int64 { return s.blockSize }

// Dir returns the store's absolute directory.
func (s *Store) Dir() string { return s.dir }

// newEntry makes the entry of an object generation; m.Length must be
// between 0 and MaxMaxObjectSize.
func (s *Store) newEntry(key string, gen uint64, m Meta) *entry {
	n := int((m.Length + s.blockSize - 1) >> s.shift)
	return &entry{
		key:     key,
		gen:     gen,
		meta:    m,
		nblocks: n,
		present: make([]atomic.Uint64, (n+63)/64),
		crc:     make(checksums, (n+crcChunk-1)/crcChunk),
	}
}

// checkLength refuses a new object's length outside [0, MaxObjectSize].
func (s *Store) checkLength(length int64) error {
	if length < 0 {
		return fmt.Errorf("rangestore: negative length %d", length)
	}
	if length > s.opts.MaxObjectSize {
		return fmt.Errorf("%w: length %d exceeds MaxObjectSize %d", ErrTooLarge, length, s.opts.MaxObjectSize)
	}
	return nil
}

// validLength reports whether a length read back from the index or the
// journal can be given an entry.
func validLength(length int64) bool { return length >= 0 && length <= MaxMaxObjectSize }

func (s *Store) dataPath(gen uint64) string {
	return filepath.Join(s.dir, "data", fmt.Sprintf("%02x", gen&0xff), strconv.FormatUint(gen, 16))
}

// blockLen is the length of block i of an object of the given length.
func (s *Store) blockLen(length int64, i int) int64 {
	off := int64(i) << s.shift
	return min(s.blockSize, length-off)
}

// Get opens the stored object key for reading or writing, and marks it
// recently used. The caller must Close it.
func (s *Store) Get(key string) (*Object, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	e := s.objects[key]
	if e == nil {
		return nil, ErrNotFound
	}
	return s.ref(e), nil
}

// Create opens the object key, creating it with meta if it does not exist.
// If it exists with another identity (see Meta.SameIdentity), Create returns
// an error wrapping ErrIdentityMismatch; the caller may Invalidate the key
// and create it again. A length above Options.MaxObjectSize gives an error
// wrapping ErrTooLarge. The caller must Close the object.
func (s *Store) Create(key string, meta Meta) (*Object, error) {
	if err := s.checkLength(meta.Length); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	if e := s.objects[key]; e != nil {
		if !e.meta.SameIdentity(meta) {
			return nil, fmt.Errorf("%w: %q stored as length %d etag %q last-modified %q, now length %d etag %q last-modified %q",
				ErrIdentityMismatch, key, e.meta.Length, e.meta.ETag, e.meta.LastModified, meta.Length, meta.ETag, meta.LastModified)
		}
		return s.ref(e), nil
	}
	s.nextGen++
	e := s.newEntry(key, s.nextGen, cloneMeta(meta))
	e.lastAccess = s.now()
	e.savedAccess = e.lastAccess
	s.enc.b = s.enc.b[:0]
	s.enc.byte(recCreate)
	s.enc.uint(e.gen)
	s.enc.string(key)
	s.enc.meta(&e.meta)
	s.enc.int(e.lastAccess)
	if err := s.appendRecord(); err != nil {
		return nil, err
	}
	s.objects[key] = e
	e.elem = s.lru.PushFront(e)
	return s.ref(e), nil
}

func cloneMeta(m Meta) Meta {
	if m.Header != nil {
		h := make(map[string][]string, len(m.Header))
		for k, v := range m.Header {
			h[k] = append([]string(nil), v...)
		}
		m.Header = h
	}
	m.Internal = maps.Clone(m.Internal)
	return m
}

// ref takes a reference to e for a new Object handle. s.mu must be held.
func (s *Store) ref(e *entry) *Object {
	if e.idle != nil {
		s.idle.Remove(e.idle)
		e.idle = nil
	}
	e.refs++
	s.touch(e)
	return &Object{s: s, e: e}
}

// accessGrain is how stale the recorded last use of an object may grow
// before a snapshot is due to record it: coarse, so that hits cost no
// write, yet fine enough to tell apart objects used minutes apart.
const accessGrain = int64(time.Minute)

// touch marks e used now. s.mu must be held. Only indexed objects (with an
// LRU element) make a snapshot due: transient and removed ones are in no
// index.
func (s *Store) touch(e *entry) {
	e.lastAccess = s.now()
	if e.elem == nil {
		return
	}
	if e.lastAccess-e.savedAccess >= accessGrain {
		s.accessDirty = true
	}
	s.lru.MoveToFront(e.elem)
}

// release drops a reference; the last one closes the shared descriptor and
// unlinks the data of an invalidated object.
func (s *Store) release(e *entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releaseLocked(e)
}

// releaseLocked is release with s.mu held.
func (s *Store) releaseLocked(e *entry) {
	e.refs--
	if e.refs > 0 {
		return
	}
	s.touch(e)
	if e.deleted || e.transient {
		s.unlink(e)
		return
	}
	// Keep the descriptor of a recently used object open, so its next
	// reader (a hit) does not pay an open(2) and close(2).
	if e.file.Load() != nil {
		e.idle = s.idle.PushFront(e)
		if s.idle.Len() > maxIdleFiles {
			s.closeFile(s.idle.Back().Value.(*entry))
		}
	}
}

// maxIdleFiles bounds the descriptors kept open for objects nobody holds.
const maxIdleFiles = 256

// closeFile closes e's shared descriptor; nobody may hold e. s.mu must be
// held.
func (s *Store) closeFile(e *entry) {
	e.rmu.Lock()
	if f := e.file.Swap(nil); f != nil {
		f.Close()
	}
	e.rmu.Unlock()
	if e.idle != nil {
		s.idle.Remove(e.idle)
		e.idle = nil
	}
}

// appendRecord frames s.enc.b into the journal. When the file system is
// full it evicts least-recently-used objects and tries once more, so a full
// disk does not wedge the store. s.mu must be held.
func (s *Store) appendRecord() error {
	if s.closed {
		return ErrClosed
	}
	s.fbuf = frame(s.fbuf[:0], s.enc.b)
	err := s.writeRecord(s.fbuf)
	if isNoSpace(err) && !s.noEvict {
		// Evicting journals delete records through this function, which
		// reuses s.enc and s.fbuf: keep our record aside.
		rec := append([]byte(nil), s.fbuf...)
		freed := s.evictBytes(s.blockSize, nil)
		if freed > 0 {
			err = s.writeRecord(rec)
		}
	}
	if err != nil {
		return fmt.Errorf("rangestore: journal: %w", err)
	}
	s.changes++
	if s.changes == snapshotRecords {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
	return nil
}

// deleteReserve is the journal space kept allocated past its end for
// delete records (about 3,000 of them), so that removing an object never
// fails for want of space: a lost delete record would bring the object
// back after a crash, and an invalidated one still held open would come
// back with its blocks.
const deleteReserve = 64 << 10

// writeRecord appends one framed record. Delete records (written with
// s.noEvict set) may use the journal's reserve; any other record first
// makes sure the reserve stays whole after it, failing with ErrNoSpace
// when the file system cannot give that. s.mu must be held.
func (s *Store) writeRecord(rec []byte) error {
	if !s.noEvict {
		if err := s.reserveJournal(s.journal, s.jsize+int64(len(rec))); err != nil {
			return err
		}
	}
	return s.writeJournal(rec)
}

// reserveJournal makes sure f, a journal of size bytes, has deleteReserve
// bytes allocated past its end, allocating twice that when it must so that
// it rarely has to (fallocate(2), keeping the size). f is s.journal, with
// s.mu held, or a new journal not yet in use.
func (s *Store) reserveJournal(f *os.File, size int64) error {
	if s.noPrealloc.Load() || f == s.journal && s.jalloc >= size+deleteReserve {
		return nil
	}
	n := 2 * deleteReserve
	err := syscall.Fallocate(int(f.Fd()), fallocKeepSize, size, int64(n))
	switch {
	case errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS):
		s.noPrealloc.Store(true) // deletes take their chance, as they must
		return nil
	case err != nil:
		return fmt.Errorf("rangestore: journal: %w", noSpace(err))
	}
	if f == s.journal {
		s.jalloc = size + int64(n)
	}
	return nil
}

// writeJournal appends one framed record. A failed or short write is cut
// off again, so the journal stays a sequence of whole records and later
// appends are not stranded behind a torn one that Open would stop at.
// s.mu must be held.
func (s *Store) writeJournal(rec []byte) error {
	if s.jtorn {
		return fmt.Errorf("rangestore: journal ends in a torn record until the next snapshot")
	}
	n, err := s.journal.Write(rec)
	if err == nil {
		s.jsize += int64(n)
		return nil
	}
	if n > 0 {
		s.jalloc = 0 // truncating gives the reserve back
		if terr := s.journal.Truncate(s.jsize); terr != nil {
			// The journal now ends in a torn record that would hide every
			// later one; refuse further records until the next snapshot
			// starts a fresh journal.
			s.jtorn = true
			return fmt.Errorf("%w (and truncating the torn record: %v)", noSpace(err), terr)
		}
	}
	return noSpace(err)
}

// snapshotRecords is how many journal records trigger a snapshot before the
// interval is up, bounding both the journal and the blocks to verify after a
// crash: at most twice this many, those of the journal and those the last
// snapshot lists as not yet synced.
const snapshotRecords = 4096

// remove takes e out of the index and journals its deletion; its data goes
// when its last reader closes it. s.mu must be held.
func (s *Store) remove(e *entry) {
	if e.deleted {
		return
	}
	e.deleted = true
	delete(s.objects, e.key)
	s.lru.Remove(e.elem)
	e.elem = nil
	// Unlinking first frees the space a full disk needs for the record.
	// Either order is safe in a crash: Open removes data files of deleted
	// generations, and forgets the blocks of entries whose file is gone.
	if e.refs == 0 {
		s.unlink(e)
	}
	s.enc.b = s.enc.b[:0]
	s.enc.byte(recDelete)
	s.enc.uint(e.gen)
	// The record goes to the journal's reserve. Should even that be used
	// up, a full disk must not make it evict others, which would recurse
	// here; Open forgets an object whose data file is gone, so only an
	// object held open or without data could come back.
	noEvict := s.noEvict
	s.noEvict = true
	_ = s.appendRecord()
	s.noEvict = noEvict
}

func (s *Store) unlink(e *entry) {
	s.closeFile(e)
	if e.hasFile {
		os.Remove(s.dataPath(e.gen))
		e.hasFile = false
	}
	s.used -= e.presentBytes
	e.presentBytes = 0
}

// CreateTransient makes an object stored under no key, for bytes that may
// be written to stream them to their readers but must not be kept (an HTTP
// response marked no-store): Get never finds it, it is not journalled, it
// counts against the disk budget while it lives, and its data file is
// unlinked when its last handle closes (and removed at Open after a crash).
// Its length is limited like Create's. The caller must Close it.
func (s *Store) CreateTransient(meta Meta) (*Object, error) {
	if err := s.checkLength(meta.Length); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	s.nextGen++
	e := s.newEntry("", s.nextGen, cloneMeta(meta))
	e.transient = true
	return s.ref(e), nil
}

// Invalidate removes the object key; it reports whether there was one.
// Holders of the object keep reading the old bytes until they close it.
func (s *Store) Invalidate(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		// The directory may already belong to another Store.
		return false
	}
	e := s.objects[key]
	if e == nil {
		return false
	}
	s.remove(e)
	return true
}

// Purge invalidates every object whose key starts with prefix and returns
// how many there were.
func (s *Store) Purge(prefix string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0
	}
	n := 0
	for k, e := range s.objects {
		if strings.HasPrefix(k, prefix) {
			s.remove(e)
			n++
		}
	}
	return n
}

// List returns every object, sorted by key.
func (s *Store) List() []ObjectInfo {
	s.mu.Lock()
	out := make([]ObjectInfo, 0, len(s.objects))
	for _, e := range s.objects {
		out = append(out, ObjectInfo{Key: e.key, Size: e.meta.Length, BytesPresent: e.presentBytes, LastAccess: time.Unix(0, e.lastAccess)})
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Stats returns the store's totals.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{
		Objects:      len(s.objects),
		BytesPresent: s.used,
		BytesWriting: s.reserved,
		MaxSize:      s.opts.MaxSize,
		MinFree:      s.opts.MinFree,
		BlockSize:    s.blockSize,
		Evictions:    s.evictions,
	}
}

// Close writes a final snapshot and releases the directory. Objects still
// open stay readable; writes to them fail with ErrClosed, as do Get and
// Create, and Invalidate and Purge do nothing. A second Close returns
// ErrClosed.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrClosed
	}
	s.closing = true
	s.mu.Unlock()
	close(s.stop)
	<-s.done
	// The final snapshot marks the store closed in the same critical
	// section that captures the index, so no commit can land in the journal
	// after it and a clean Close leaves nothing to replay.
	err := s.snapshot(true)
	s.mu.Lock()
	s.closed = true
	jerr := s.journal.Close()
	for s.idle.Len() > 0 {
		s.closeFile(s.idle.Front().Value.(*entry))
	}
	s.mu.Unlock()
	if err == nil && jerr == nil {
		s.markClosed()
	}
	s.lock.Close()
	return errors.Join(err, jerr)
}

// noSpace marks ENOSPC and EDQUOT so callers can test for ErrNoSpace.
func noSpace(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
}

// WriteFileAtomic replaces the file at path with b so that a crash leaves
// either the old contents or the new ones, never a torn file: it writes a
// temporary file beside it, syncs it, renames it over path and syncs the
// directory.
func WriteFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("rangestore: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rangestore: writing %s: %w", path, noSpace(err))
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
