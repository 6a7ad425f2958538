package caddymcc

import (
	"errors"
	"io"
	"net/http"
	"os"
	"sync"
	"syscall"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Serving bytes of a data file so that they reach sendfile(2).
//
// net.TCPConn.ReadFrom uses sendfile only for an *os.File (any
// syscall.Conn) that is bare or inside ONE *io.LimitedReader. Caddy 2.11
// wraps every response in an IdleTimeoutWriter whose ReadFrom hands the
// source on in io.LimitReader chunks of the server's max_write_chunk (64 KiB
// by default) to reset the write deadline between them. An
// io.CopyN(w, file, n), as http.ServeContent does, therefore arrives as a
// LimitedReader inside a LimitedReader and is copied through user space (why
// Caddy's own file_server does not reach sendfile). fileSpan is the source
// that works with that chunking: a syscall.Conn while at least a whole chunk
// of the span is left, so each chunk goes out by sendfile, and a bounded
// Reader for the tail.

// sender copies spans of data files to one response.
type sender struct {
	w     io.Writer
	chunk int64 // the writer chain's ReadFrom chunk; 0 when it has none
}

func newSender(w http.ResponseWriter, r *http.Request) sender {
	s := sender{w: w}
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv.WriteIdleTimeout > 0 {
		s.chunk = int64(srv.MaxWriteChunk)
		if s.chunk <= 0 {
			s.chunk = caddyhttp.DefaultMaxWriteChunk
		}
	}
	return s
}

// smallSpan is the largest span copied through a buffer: below it, one
// pread and a Write that joins the header's write beat open, seek and
// sendfile (and sub-chunk tails cannot use sendfile anyway).
const smallSpan = 64 << 10

var spanBuffers = sync.Pool{New: func() any { return new([smallSpan]byte) }}

// sendSmall copies n <= smallSpan bytes at off of r through a pooled buffer.
func (s sender) sendSmall(r io.ReaderAt, off, n int64) error {
	buf, err := readSmall(r, off, n)
	if err != nil {
		return err
	}
	defer spanBuffers.Put(buf)
	_, err = s.w.Write(buf[:n])
	return err
}

// readSmall reads n <= smallSpan bytes at off of r into a pooled buffer,
// which the caller puts back in spanBuffers.
func readSmall(r io.ReaderAt, off, n int64) (*[smallSpan]byte, error) {
	buf := spanBuffers.Get().(*[smallSpan]byte)
	m, err := r.ReadAt(buf[:n], off)
	if m == int(n) {
		return buf, nil
	}
	spanBuffers.Put(buf)
	return nil, err
}

// send copies n bytes at off of f to the response.
func (s sender) send(f *os.File, off, n int64) error {
	if n <= 0 {
		return nil
	}
	if n <= smallSpan {
		return s.sendSmall(f, off, n)
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return err
	}
	var src io.Reader
	if s.chunk > 0 {
		src = &fileSpan{f: f, end: off + n, chunk: s.chunk}
	} else {
		src = &io.LimitedReader{R: f, N: n}
	}
	m, err := io.Copy(s.w, src)
	if err == nil && m != n {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// fileSpan reads the bytes of f from its offset up to end.
type fileSpan struct {
	f     *os.File
	end   int64
	chunk int64
}

var errTail = errors.New("less than a chunk left")

// SyscallConn offers the file to sendfile only while a whole chunk is left:
// sendfile is bounded by the chunk's LimitedReader, not by end.
func (s *fileSpan) SyscallConn() (syscall.RawConn, error) {
	pos, err := s.f.Seek(0, io.SeekCurrent)
	if err != nil {
		return nil, err
	}
	if s.end-pos < s.chunk {
		return nil, errTail
	}
	return s.f.SyscallConn()
}

func (s *fileSpan) Read(p []byte) (int, error) {
	pos, err := s.f.Seek(0, io.SeekCurrent)
	if err != nil {
		return 0, err
	}
	if pos >= s.end {
		return 0, io.EOF
	}
	if left := s.end - pos; int64(len(p)) > left {
		p = p[:left]
	}
	return s.f.Read(p)
}
