package caddymcc

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// DefaultOrigins are the origins served when none are configured: the
// Device Update content hosts and the host of Microsoft's documented cache
// smoke test (/mscomtest/wuidt.gif).
var DefaultOrigins = []string{
	"*.tlu.dl.adu.microsoft.com",
	"*.nlu.dl.adu.microsoft.com",
	"*.dcsfe.prod.adu.microsoft.com",
	"au.download.windowsupdate.com",
}

// originParam is the query parameter in which Delivery Optimization agents
// carry the origin host: http://<cache>/<path>?cacheHostOrigin=<host>.
const originParam = "cacheHostOrigin"

// originPattern is one allowed origin: an exact host name, or "*.suffix",
// which matches any host name ending in ".suffix" (one or more labels
// before it) but not "suffix" itself.
type originPattern struct {
	host   string // exact match, when suffix is empty
	suffix string // ".suffix" for a wildcard
}

func parseOriginPattern(s string) (originPattern, error) {
	if rest, ok := strings.CutPrefix(s, "*."); ok {
		if err := checkHostName(strings.ToLower(rest)); err != nil {
			return originPattern{}, fmt.Errorf("origin pattern %q: %v", s, err)
		}
		return originPattern{suffix: "." + strings.ToLower(rest)}, nil
	}
	host, err := parseOriginHost(s)
	if err != nil {
		return originPattern{}, fmt.Errorf("origin pattern %q: %v", s, err)
	}
	return originPattern{host: host}, nil
}

// parseOriginHost reads an origin named exactly: a host name, lower-cased,
// optionally with a port other than 80 (an origin on port 80 is named
// without it, as DO agents do). The port is part of the origin's identity:
// it must be configured to be served, and it is part of the cache key.
func parseOriginHost(s string) (string, error) {
	h := strings.ToLower(s)
	host, port, hasPort := strings.Cut(h, ":")
	if err := checkHostName(host); err != nil {
		return "", err
	}
	if !hasPort {
		return host, nil
	}
	if checkPort(port) != nil || port == "80" {
		return "", errors.New("not a host name (a port must be 1-65535 and not 80)")
	}
	return h, nil
}

func (p originPattern) match(host string) bool {
	if p.suffix == "" {
		return host == p.host
	}
	return len(host) > len(p.suffix) && strings.HasSuffix(host, p.suffix)
}

// checkHostName accepts only a plain, lower-case DNS name: labels of
// letters, digits and inner hyphens, no trailing dot, no port, no userinfo,
// no escapes. Anything looser lets "allowed.com@evil.com" or
// "allowed.com:80@evil" reach the proxy's dialer as another host.
func checkHostName(h string) error {
	if h == "" || len(h) > 253 {
		return errors.New("not a host name")
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return errors.New("not a host name")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return fmt.Errorf("not a host name (character %q)", c)
			}
		}
	}
	return nil
}

// target is what a client request is for: which origin, what to ask it
// for, and under which key it is cached.
type target struct {
	origin string // lower-case origin host
	uri    string // normalised path and query to ask the origin for, without cacheHostOrigin
	key    string // cache key: origin host (or its canonical host) + uri
}

// errNotAllowed is a request whose origin the cache does not serve; it is
// answered 403, which Delivery Optimization agents take as "not served
// here" for that origin only.
type errNotAllowed struct{ reason string }

func (e errNotAllowed) Error() string { return e.reason }

// classify finds the origin of r and checks it against the allowlist. The
// origin comes from the cacheHostOrigin query parameter, or, without one,
// from the Host header (Configuration Manager's form) when that host is
// itself an allowed origin.
func classify(r *http.Request, allowed []originPattern) (target, error) {
	rawQuery := r.URL.RawQuery
	rest, origins, err := splitOriginParam(rawQuery)
	if err != nil {
		return target{}, errNotAllowed{err.Error()}
	}
	var host string
	switch len(origins) {
	case 0:
		host = r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		host = strings.ToLower(host)
		if checkHostName(host) != nil || !allowedHost(host, allowed) {
			return target{}, errNotAllowed{"no cacheHostOrigin and host " + quoteShort(r.Host) + " is not a cached origin"}
		}
	case 1:
		host, err = parseOriginHost(origins[0])
		if err != nil {
			return target{}, errNotAllowed{"cacheHostOrigin " + quoteShort(origins[0]) + ": " + err.Error()}
		}
		if !allowedHost(host, allowed) {
			return target{}, errNotAllowed{"origin " + host + " is not cached here"}
		}
	default:
		return target{}, errNotAllowed{"more than one cacheHostOrigin"}
	}
	if r.URL.Opaque != "" {
		return target{}, errNotAllowed{"path must start with /"}
	}
	p := r.URL.EscapedPath()
	if p == "" {
		// An absolute-form request with no path ("GET http://host
		// HTTP/1.1") asks for "/" (RFC 9110 section 4.2.3).
		p = "/"
	}
	if p[0] != '/' {
		return target{}, errNotAllowed{"path must start with /"}
	}
	// The key and the upstream request are built from one normalised
	// path: were the upstream asked for the path as sent, an origin that
	// does not resolve dot segments would store /x/../a under the key /a.
	uri := normalizePath(p)
	if rest != "" {
		uri += "?" + rest
	}
	return target{origin: host, uri: uri, key: host + uri}, nil
}

// normalizePath returns the normal form of an escaped absolute path (RFC
// 3986 section 6.2.2): percent-encodings of unreserved characters decoded,
// the hex digits of the others in upper case, and "." and ".." segments
// resolved. So /repo/./x.deb (what apt asks of a flat repository),
// /repo/%2E/x.deb and /repo/x.deb are one resource and one cache entry,
// and no spelling of ".." reaches above the root. Reserved characters stay
// encoded: %2F is not a segment separator.
func normalizePath(p string) string {
	if strings.Contains(p, "%") {
		var b strings.Builder
		b.Grow(len(p))
		for i := 0; i < len(p); i++ {
			c := p[i]
			if c == '%' && i+2 < len(p) && isHex(p[i+1]) && isHex(p[i+2]) {
				v := unhex(p[i+1])<<4 | unhex(p[i+2])
				if unreserved(v) {
					b.WriteByte(v)
				} else {
					b.WriteByte('%')
					b.WriteByte(upperHex[v>>4])
					b.WriteByte(upperHex[v&15])
				}
				i += 2
				continue
			}
			b.WriteByte(c)
		}
		p = b.String()
	}
	return removeDotSegments(p)
}

const upperHex = "0123456789ABCDEF"

func isHex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F' }

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

// unreserved reports whether c is an RFC 3986 unreserved character, which
// means the same escaped or not (section 2.3).
func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}

// removeDotSegments resolves "." and ".." path segments (RFC 3986 section
// 5.2.4) of a path that starts with "/".
func removeDotSegments(p string) string {
	if !strings.Contains(p, "/.") {
		return p
	}
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	for i, seg := range segs {
		last := i == len(segs)-1
		switch seg {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, seg)
		}
	}
	return "/" + strings.Join(out, "/")
}

func allowedHost(host string, allowed []originPattern) bool {
	for _, p := range allowed {
		if p.match(host) {
			return true
		}
	}
	return false
}

// splitOriginParam removes every cacheHostOrigin parameter from a raw query,
// keeping the other parameters byte for byte and in order, and returns their
// decoded values. A name is compared decoded, as every server reads it:
// "cacheHost%4Frigin" left in the query would name an origin to a parent
// gateway.
func splitOriginParam(rawQuery string) (rest string, origins []string, err error) {
	if !strings.Contains(rawQuery, originParam) && !strings.Contains(rawQuery, "%") {
		return rawQuery, nil, nil
	}
	var kept []string
	for _, part := range strings.Split(rawQuery, "&") {
		name, value, _ := strings.Cut(part, "=")
		if n, err := url.QueryUnescape(name); err == nil && n == originParam {
			v, err := url.QueryUnescape(value)
			if err != nil {
				return "", nil, fmt.Errorf("bad cacheHostOrigin escape")
			}
			origins = append(origins, v)
			continue
		}
		kept = append(kept, part)
	}
	return strings.Join(kept, "&"), origins, nil
}

// quoteShort quotes s for an error message, cut to a sane length.
func quoteShort(s string) string {
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return fmt.Sprintf("%q", s)
}

// replaceOriginParam returns rawQuery with its cacheHostOrigin parameter
// naming host instead, and false when it has none.
func replaceOriginParam(rawQuery, host string) (string, bool) {
	rest, origins, err := splitOriginParam(rawQuery)
	if err != nil || len(origins) == 0 {
		return rawQuery, false
	}
	if rest != "" {
		rest += "&"
	}
	return rest + originParam + "=" + url.QueryEscape(host), true
}
