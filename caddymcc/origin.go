package caddymcc

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
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
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 || n == 80 || strconv.Itoa(n) != port {
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

// request is what the handler makes of a client request: which origin it is
// for and how it is cached.
type request struct {
	origin string // lower-case origin host
	uri    string // path and query to ask the origin for, without cacheHostOrigin
	key    string // cache key: origin host + uri
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
func classify(r *http.Request, allowed []originPattern) (request, error) {
	rawQuery := r.URL.RawQuery
	rest, origins, err := splitOriginParam(rawQuery)
	if err != nil {
		return request{}, errNotAllowed{err.Error()}
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
			return request{}, errNotAllowed{"no cacheHostOrigin and host " + quoteShort(r.Host) + " is not a cached origin"}
		}
	case 1:
		host, err = parseOriginHost(origins[0])
		if err != nil {
			return request{}, errNotAllowed{"cacheHostOrigin " + quoteShort(origins[0]) + ": " + err.Error()}
		}
		if !allowedHost(host, allowed) {
			return request{}, errNotAllowed{"origin " + host + " is not cached here"}
		}
	default:
		return request{}, errNotAllowed{"more than one cacheHostOrigin"}
	}
	uri := r.URL.EscapedPath()
	if uri == "" || uri[0] != '/' {
		return request{}, errNotAllowed{"path must start with /"}
	}
	key := host + removeDotSegments(uri)
	if rest != "" {
		uri += "?" + rest
		key += "?" + rest
	}
	return request{origin: host, uri: uri, key: key}, nil
}

// removeDotSegments resolves "." and ".." path segments (RFC 3986 section
// 5.2.4) for the cache key, so /repo/./x.deb (what apt asks of a flat
// repository) and /repo/x.deb share one entry, as they are one resource.
// The upstream still gets the path as the client sent it.
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
// decoded values.
func splitOriginParam(rawQuery string) (rest string, origins []string, err error) {
	if !strings.Contains(rawQuery, originParam) {
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
