// Package rangestore keeps byte ranges of large remote objects on disk, in
// fixed-size blocks, for a range cache.
//
// An object is addressed by a string key and has a fixed identity (length,
// ETag, Last-Modified) pinned by its first write. Its bytes live in one sparse
// data file; which blocks are present, and the CRC-32C of each, live in the
// store's index. A block becomes visible to readers only once all its bytes
// are written and its commit record is in the journal, so nothing partial is
// ever read as present.
//
// On disk a store directory holds:
//
//	FORMAT          format version and block size, fixed for the directory
//	LOCK            flock(2) held by the process that has the store open
//	index           zstd-compressed snapshot of every object (atomic rename)
//	journal-<seq>   append-only records since that snapshot (create, block, delete)
//	data/xx/<gen>   one sparse file per object generation
//
// Opening replays the journal on top of the snapshot. Data files are synced
// one snapshot late (by then the kernel has mostly written them back, and
// data deleted meanwhile is never synced), so the blocks committed in the
// journal and those the snapshot lists as not yet synced are checked against
// their CRC-32C before they count as present: their bytes may not have
// reached the disk before a crash. Older blocks are trusted without reading
// them. After a clean Close the journal is empty, everything is synced, and
// opening costs one snapshot read.
// Store.Recovery says what opening did. The index keeps each object's
// last use, and journal records the time of theirs, so the order of
// eviction survives a crash to within a SnapshotInterval.
//
// The store keeps to a disk budget: MaxSize bytes of present blocks and
// MinFree bytes free on the file system. Writes that would cross either evict
// least-recently-used objects first. An object that a caller holds open is
// never evicted; an invalidated object is unlinked when its last holder
// closes it, so readers never see its bytes change. A full file system gives
// errors wrapping ErrNoSpace, never a partial block, after evicting
// least-recently-used objects so that the next attempt can succeed. The
// journal keeps 64 KiB allocated past its end for delete records alone, so
// an object removed on a full disk stays removed after a crash.
package rangestore
