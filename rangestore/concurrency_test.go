package rangestore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
)

func TestTwoWritersSameBlockOneWins(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	create(t, s, "k", metaV(2*testBS, 1)).Close()
	const writers = 8

	for _, winnerAborts := range []bool{false, true} {
		t.Run(fmt.Sprint("winnerAborts=", winnerAborts), func(t *testing.T) {
			block := 0
			if winnerAborts {
				block = 1
			}
			var (
				start    = make(chan struct{})
				tried    sync.WaitGroup // every writer has tried once
				wg       sync.WaitGroup
				wins     atomic.Int32
				busy     atomic.Int32
				retryWon atomic.Int32
			)
			tried.Add(writers)
			for range writers {
				wg.Go(func() {
					o, err := s.Get("k")
					if err != nil {
						t.Error(err)
						tried.Done()
						return
					}
					defer o.Close()
					<-start
					w, err := o.WriteBlock(block)
					tried.Done()
					switch {
					case err == nil:
						wins.Add(1)
						// Hold the block until everyone else was refused.
						tried.Wait()
						if winnerAborts {
							w.Write(make([]byte, 100))
							w.Abort()
							return
						}
						b := o.Block(block)
						w.Write(content(seedOf("k", o.Meta().ETag), b.Off, b.Len))
						if err := w.Commit(); err != nil {
							t.Error(err)
						}
						return
					case errors.Is(err, ErrBlockBusy):
						busy.Add(1)
					default:
						t.Errorf("concurrent WriteBlock: %v", err)
						return
					}
					if !winnerAborts {
						return
					}
					// After the winner gave up, exactly one retry wins.
					tried.Wait()
					for {
						err := tryWriteBlock(o, block, 4096)
						switch {
						case err == nil:
							retryWon.Add(1)
							return
						case errors.Is(err, ErrBlockPresent):
							return
						case !errors.Is(err, ErrBlockBusy):
							t.Errorf("retry: %v", err)
							return
						}
					}
				})
			}
			close(start)
			wg.Wait()
			if wins.Load() != 1 || busy.Load() != writers-1 {
				t.Errorf("%d writers got the block and %d were refused as busy, want 1 and %d", wins.Load(), busy.Load(), writers-1)
			}
			if winnerAborts && retryWon.Load() != 1 {
				t.Errorf("%d retries after the abort won, want 1", retryWon.Load())
			}
			o, _ := s.Get("k")
			defer o.Close()
			if !o.HasBlock(block) {
				t.Fatal("block not present")
			}
			if _, err := o.WriteBlock(block); !errors.Is(err, ErrBlockPresent) {
				t.Errorf("WriteBlock of the won block: %v", err)
			}
			checkObject(t, o)
			if st := s.Stats(); st.BytesWriting != 0 {
				t.Errorf("BytesWriting after all writers finished = %d", st.BytesWriting)
			}
		})
	}
}

// TestConcurrentReadersAndWritersOnManyObjects runs writers, readers,
// invalidations, evictions, snapshots and listings at once; every read must
// return exactly the content of the version it read, and the budget must
// hold throughout. Run with -race.
func TestConcurrentReadersAndWritersOnManyObjects(t *testing.T) {
	const (
		keys    = 12
		blocks  = 6
		max     = 24 * testBS
		writers = 6
		readers = 6
		ops     = 150
	)
	dir := t.TempDir()
	s := openStore(t, dir, Options{MaxSize: max})
	length := func(v int) int64 { return blocks*testBS - int64(v%3)*1000 }

	var wg sync.WaitGroup
	var writes, reads atomic.Int64
	for g := range writers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for range ops {
				key := fmt.Sprint("k", rng.IntN(keys))
				if rng.IntN(20) == 0 {
					s.Invalidate(key)
					continue
				}
				o, err := s.Get(key)
				if errors.Is(err, ErrNotFound) {
					v := rng.IntN(100)
					o, err = s.Create(key, metaV(length(v), v))
					if errors.Is(err, ErrIdentityMismatch) {
						continue // another writer created another version
					}
				}
				if err != nil {
					t.Error(err)
					return
				}
				i := rng.IntN(o.Blocks())
				switch err := tryWriteBlock(o, i, 1<<(10+rng.IntN(7))); {
				case err == nil:
					writes.Add(1)
				case errors.Is(err, ErrBlockBusy), errors.Is(err, ErrBlockPresent),
					errors.Is(err, ErrGone), errors.Is(err, ErrNoSpace):
				default:
					t.Errorf("write %s block %d: %v", key, i, err)
				}
				o.Close()
			}
		})
	}
	for g := range readers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 2))
			p := make([]byte, 2*testBS)
			for range 2 * ops {
				o, err := s.Get(fmt.Sprint("k", rng.IntN(keys)))
				if errors.Is(err, ErrNotFound) {
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				off := rng.Int64N(o.Size())
				q := p[:1+rng.IntN(len(p))]
				seed := seedOf(o.Key(), o.Meta().ETag)
				n, err := o.ReadAt(q, off)
				switch {
				case err == nil || err == io.EOF:
					if !bytes.Equal(q[:n], content(seed, off, int64(n))) {
						t.Errorf("%s %s: wrong bytes at %d", o.Key(), o.Meta().ETag, off)
					}
					reads.Add(1)
					// A present range never reports missing blocks.
					if m := o.Missing(off, int64(n)); len(m) != 0 {
						t.Errorf("read %d bytes at %d, then Missing = %v", n, off, m)
					}
				case errors.Is(err, ErrNotPresent):
				default:
					t.Errorf("ReadAt: %v", err)
				}
				o.Close()
			}
		})
	}
	stop := make(chan struct{})
	var side sync.WaitGroup
	side.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			st := s.Stats()
			if st.BytesPresent+st.BytesWriting > max {
				t.Errorf("over budget: %+v", st)
			}
			for _, info := range s.List() {
				if info.BytesPresent > info.Size {
					t.Errorf("listed %+v", info)
				}
			}
			if err := s.snapshot(false); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()
	close(stop)
	side.Wait()
	t.Logf("%d blocks written, %d reads hit, %d evictions", writes.Load(), reads.Load(), s.Stats().Evictions)
	if writes.Load() == 0 || reads.Load() == 0 {
		t.Error("the test did nothing")
	}
	checkStore(t, s)

	want := presence(t, s)
	s.crash()
	s = openStore(t, dir, Options{MaxSize: max})
	defer s.Close()
	if got := presence(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after crash:\n got %v\nwant %v", got, want)
	}
	checkStore(t, s)
}

// Readers sharing one hot object must not disturb each other, nor the
// holder's Close while others still read.
func TestConcurrentReadersShareOneObject(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	defer s.Close()
	o := create(t, s, "hot", metaV(4*testBS, 1))
	for i := range 4 {
		writeBlock(t, o, i, 0)
	}
	o.Close()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 3))
			p := make([]byte, 10000)
			for range 200 {
				o, err := s.Get("hot")
				if err != nil {
					t.Error(err)
					return
				}
				off := rng.Int64N(o.Size() - int64(len(p)))
				if _, err := o.ReadAt(p, off); err != nil || !bytes.Equal(p, content(seedOf("hot", `"v1"`), off, int64(len(p)))) {
					t.Errorf("ReadAt %d: %v", off, err)
				}
				o.Close()
			}
		})
	}
	wg.Wait()
}
