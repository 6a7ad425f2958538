package rangestore

import (
	"fmt"
	"time"
)

// RecoveryStats says what Open did to bring the store back: after a clean
// Close it reads one snapshot and checks nothing; after a crash it replays
// the journal and reads back the blocks not known to be on disk.
type RecoveryStats struct {
	// Clean reports that the previous process closed the store with Close
	// (or that nothing needed recovering, for a store last opened by a
	// version that did not record it).
	Clean bool
	// Objects is the number of objects after recovery.
	Objects int
	// Records is the number of journal records replayed.
	Records int
	// TornTail reports that the journal ended in a torn record, cut off.
	TornTail bool
	// BlocksChecked is the number of blocks read back against their
	// checksums: those committed since the last snapshot or not yet synced
	// by it.
	BlocksChecked int
	// BlocksDropped is the number of those that did not match (their
	// bytes never fully reached the disk) and are missing again.
	BlocksDropped int
	// ObjectsDropped is the number of objects forgotten because their data
	// file was gone: deleted by a process that crashed before recording it.
	ObjectsDropped int
	// Duration is how long Open took.
	Duration time.Duration
}

// String renders r as one line for a log.
func (r RecoveryStats) String() string {
	how := "clean shutdown"
	if !r.Clean {
		how = "unclean shutdown"
	}
	torn := ""
	if r.TornTail {
		torn = " (torn tail cut off)"
	}
	return fmt.Sprintf("rangestore recovery after %s: %d objects, %d journal records replayed%s, %d blocks checked, %d dropped, %d objects without data dropped, in %v",
		how, r.Objects, r.Records, torn, r.BlocksChecked, r.BlocksDropped, r.ObjectsDropped, r.Duration.Round(time.Microsecond))
}

// Recovery returns what Open did to recover the store.
func (s *Store) Recovery() RecoveryStats { return s.recovery }

// The LOCK file's first byte records whether the process that had the store
// open closed it: a kill or a crash leaves lockOpen behind. It is rewritten
// in place, which needs no free space.
const (
	lockOpen   = 'o'
	lockClosed = 'c'
)

// markOpen records in the LOCK file that the store is open, and reports
// what the previous process left there: true for a clean Close, false for a
// crash, and known false when nothing was recorded.
func (s *Store) markOpen() (clean, known bool) {
	var b [1]byte
	if n, _ := s.lock.ReadAt(b[:], 0); n == 1 {
		clean, known = b[0] != lockOpen, true
	}
	s.lock.WriteAt([]byte{lockOpen}, 0)
	return clean, known
}

// markClosed records a clean Close in the LOCK file.
func (s *Store) markClosed() { s.lock.WriteAt([]byte{lockClosed}, 0) }
