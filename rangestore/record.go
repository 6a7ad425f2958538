package rangestore

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"sort"
	"strings"
)

// castagnoli is the CRC-32C table used for block checksums and for framing
// journal records (hardware accelerated on amd64 and arm64).
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record kinds in the journal and the snapshot.
const (
	recCreate byte = 1 // an object generation is created with its Meta
	recBlock  byte = 2 // a block of a generation is committed, with its CRC-32C
	recDelete byte = 3 // a generation is invalidated or evicted
)

var errCorrupt = errors.New("rangestore: corrupt record")

// encoder appends the store's compact binary encoding to a byte slice.
type encoder struct{ b []byte }

func (e *encoder) byte(v byte)     { e.b = append(e.b, v) }
func (e *encoder) uint(v uint64)   { e.b = binary.AppendUvarint(e.b, v) }
func (e *encoder) int(v int64)     { e.b = binary.AppendVarint(e.b, v) }
func (e *encoder) u32(v uint32)    { e.b = binary.LittleEndian.AppendUint32(e.b, v) }
func (e *encoder) string(s string) { e.uint(uint64(len(s))); e.b = append(e.b, s...) }

// decoder reads what encoder wrote; the first error sticks and zero values
// are returned after it.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = errCorrupt
	}
	d.b = nil
}

func (d *decoder) byte() byte {
	if len(d.b) < 1 {
		d.fail()
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) uint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

// optionalUint is uint, reading 0 at the end of the input.
func (d *decoder) optionalUint() uint64 {
	if len(d.b) == 0 {
		return 0
	}
	return d.uint()
}

func (d *decoder) int() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

// optionalInt is int, reading 0 at the end of the input.
func (d *decoder) optionalInt() int64 {
	if len(d.b) == 0 {
		return 0
	}
	return d.int()
}

func (d *decoder) u32() uint32 {
	if len(d.b) < 4 {
		d.fail()
		return 0
	}
	v := binary.LittleEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

func (d *decoder) bytes(n uint64) []byte {
	if uint64(len(d.b)) < n {
		d.fail()
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string { return string(d.bytes(d.uint())) }

// encodeMeta writes m with its header names in sorted order, so equal Metas
// encode equally. Internal entries ride in the same list under names that
// start with internalMark, which no header name can (RFC 9110 section 5.1),
// so stores written before Internal existed read unchanged.
func (e *encoder) meta(m *Meta) {
	e.int(m.Length)
	e.string(m.ETag)
	e.string(m.LastModified)
	e.string(m.ContentType)
	names := make([]string, 0, len(m.Header)+len(m.Internal))
	for k := range m.Header {
		names = append(names, k)
	}
	for k := range m.Internal {
		names = append(names, internalMark+k)
	}
	sort.Strings(names)
	e.uint(uint64(len(names)))
	for _, k := range names {
		e.string(k)
		if name, ok := strings.CutPrefix(k, internalMark); ok {
			e.uint(1)
			e.string(m.Internal[name])
			continue
		}
		e.uint(uint64(len(m.Header[k])))
		for _, v := range m.Header[k] {
			e.string(v)
		}
	}
}

// internalMark starts the encoded name of a Meta.Internal entry.
const internalMark = "\x00"

func (d *decoder) meta() Meta {
	var m Meta
	m.Length = d.int()
	m.ETag = d.string()
	m.LastModified = d.string()
	m.ContentType = d.string()
	n := d.uint()
	if n > uint64(len(d.b)) {
		d.fail()
		return m
	}
	for i := uint64(0); i < n && d.err == nil; i++ {
		k := d.string()
		nv := d.uint()
		if nv > uint64(len(d.b)) {
			d.fail()
			break
		}
		vs := make([]string, 0, nv)
		for j := uint64(0); j < nv; j++ {
			vs = append(vs, d.string())
		}
		if name, ok := strings.CutPrefix(k, internalMark); ok && len(vs) == 1 {
			if m.Internal == nil {
				m.Internal = make(map[string]string)
			}
			m.Internal[name] = vs[0]
			continue
		}
		if m.Header == nil {
			m.Header = make(map[string][]string, n)
		}
		m.Header[k] = vs
	}
	return m
}

// frame wraps a record payload as [len u32][crc32c u32][payload], so a torn
// or garbled tail of the journal is recognised and ignored.
func frame(dst, payload []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(payload)))
	dst = binary.LittleEndian.AppendUint32(dst, crc32.Checksum(payload, castagnoli))
	return append(dst, payload...)
}

// unframe returns the first record of b and the rest; ok is false when b does
// not start with a whole, intact record.
func unframe(b []byte) (payload, rest []byte, ok bool) {
	if len(b) < 8 {
		return nil, nil, false
	}
	n := binary.LittleEndian.Uint32(b)
	sum := binary.LittleEndian.Uint32(b[4:])
	if uint64(n) > uint64(len(b)-8) {
		return nil, nil, false
	}
	payload = b[8 : 8+n]
	if crc32.Checksum(payload, castagnoli) != sum {
		return nil, nil, false
	}
	return payload, b[8+n:], true
}
