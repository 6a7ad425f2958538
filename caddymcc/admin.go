package caddymcc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the `admin.api.mcc` module: routes on Caddy's admin listener
// to look into the caches and act on them. Every route takes an optional
// `dir` query parameter naming the store, as in the mcc handler's `dir`;
// without it, the only store in use.
//
//	GET    /mcc/summary                the summary (see Summary)
//	GET    /mcc/objects                ?offset=&limit=&origin=&prefix=: a page of stored objects
//	DELETE /mcc/objects?key=<key>      drop one object
//	POST   /mcc/purge                  {"origin": "<host>"} or {"prefix": "<key prefix>"}
//	POST   /mcc/prefetch               {"urls": [...], "concurrency": n}: fetch through the gateway
//
// Keys are the origin host followed by the path and query the origin is
// asked for: `host/path?query`.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.mcc",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the /mcc/ routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/mcc/summary", Handler: caddy.AdminHandlerFunc(a.handleSummary)},
		{Pattern: "/mcc/objects", Handler: caddy.AdminHandlerFunc(a.handleObjects)},
		{Pattern: "/mcc/purge", Handler: caddy.AdminHandlerFunc(a.handlePurge)},
		{Pattern: "/mcc/prefetch", Handler: caddy.AdminHandlerFunc(a.handlePrefetch)},
	}
}

// apiError gives an error the admin API's form, keeping an opError's
// status.
func apiError(err error) error {
	if err == nil {
		return nil
	}
	var oe opError
	if errors.As(err, &oe) {
		return caddy.APIError{HTTPStatus: oe.status, Err: oe.err}
	}
	return err
}

func methodNotAllowed(w http.ResponseWriter, r *http.Request, allow string) error {
	w.Header().Set("Allow", allow)
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
}

func badRequest(format string, args ...any) error {
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf(format, args...)}
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

func (adminAPI) handleSummary(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return methodNotAllowed(w, r, "GET, HEAD")
	}
	return apiError(writeSummary(w, r, r.URL.Query().Get("dir")))
}

// objectList is a page of GET /mcc/objects.
type objectList struct {
	Total   int          `json:"total"` // objects matching, on every page
	Offset  int          `json:"offset"`
	Limit   int          `json:"limit"`
	Objects []objectInfo `json:"objects"`
}

type objectInfo struct {
	Key          string    `json:"key"`
	Origin       string    `json:"origin"`
	Size         int64     `json:"size"`
	BytesPresent int64     `json:"bytes_present"`
	LastAccess   time.Time `json:"last_access"`
	// Dir is the store (drive) that holds the object.
	Dir string `json:"dir"`
}

// Paging of GET /mcc/objects.
const (
	defaultObjectsLimit = 100
	maxObjectsLimit     = 10000
)

func (adminAPI) handleObjects(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	switch r.Method {
	case http.MethodGet:
	case http.MethodDelete:
		key := q.Get("key")
		if key == "" {
			return badRequest("key is required")
		}
		cs, err := findCaches(r.Context(), q.Get("dir"))
		if err != nil {
			return apiError(err)
		}
		deleted := 0
		for _, c := range cs {
			if c.store.Invalidate(key) {
				deleted++
			}
		}
		if deleted == 0 {
			return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no object %q", key)}
		}
		return writeJSON(w, map[string]any{"deleted": deleted})
	default:
		return methodNotAllowed(w, r, "GET, DELETE")
	}
	offset, limit := 0, defaultObjectsLimit
	if v := q.Get("offset"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return badRequest("offset %q is not a non-negative integer", v)
		}
		offset = n
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxObjectsLimit {
			return badRequest("limit %q is not an integer from 1 to %d", v, maxObjectsLimit)
		}
		limit = n
	}
	prefix, err := purgePrefix(q.Get("origin"), q.Get("prefix"), true)
	if err != nil {
		return err
	}
	cs, err := findCaches(r.Context(), q.Get("dir"))
	if err != nil {
		return apiError(err)
	}
	page := objectList{Offset: offset, Limit: limit, Objects: []objectInfo{}}
	for _, c := range cs {
		for _, o := range c.store.List() {
			if !strings.HasPrefix(o.Key, prefix) {
				continue
			}
			if page.Total >= offset && len(page.Objects) < limit {
				origin, _, _ := strings.Cut(o.Key, "/")
				page.Objects = append(page.Objects, objectInfo{
					Key: o.Key, Origin: origin, Size: o.Size, BytesPresent: o.BytesPresent, LastAccess: o.LastAccess.UTC(), Dir: c.dir,
				})
			}
			page.Total++
		}
	}
	return writeJSON(w, page)
}

// purgeRequest is the body of POST /mcc/purge: exactly one of its fields.
type purgeRequest struct {
	// Origin drops every object of this origin host.
	Origin string `json:"origin,omitempty"`
	// Prefix drops every object whose key starts with it.
	Prefix string `json:"prefix,omitempty"`
}

// purgePrefix turns an origin or a key prefix into a key prefix. An origin
// ends at the first "/" of a key, so purging "a.example" spares
// "a.example.net". Only a listing may name neither.
func purgePrefix(origin, prefix string, optional bool) (string, error) {
	switch {
	case origin != "" && prefix != "":
		return "", badRequest("give origin or prefix, not both")
	case origin != "":
		host := strings.ToLower(origin)
		if err := checkHostName(host); err != nil {
			return "", badRequest("origin %q: %v", origin, err)
		}
		return host + "/", nil
	case prefix == "" && !optional:
		// Purging everything is rare enough to ask for it by removing
		// the store directory.
		return "", badRequest("origin or a non-empty prefix is required")
	}
	return prefix, nil
}

func (adminAPI) handlePurge(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return methodNotAllowed(w, r, "POST")
	}
	var req purgeRequest
	if err := decodeBody(r, &req, 1<<20); err != nil {
		return err
	}
	prefix, err := purgePrefix(req.Origin, req.Prefix, false)
	if err != nil {
		return err
	}
	cs, err := findCaches(r.Context(), r.URL.Query().Get("dir"))
	if err != nil {
		return apiError(err)
	}
	purged := 0
	for _, c := range cs {
		purged += c.store.Purge(prefix)
	}
	return writeJSON(w, map[string]any{"purged": purged})
}

func decodeBody(r *http.Request, v any, limit int64) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return badRequest("decoding request body: %v", err)
	}
	return nil
}

// prefetchRequest is the body of POST /mcc/prefetch.
type prefetchRequest struct {
	// URLs are fetched from the gateway as a client would, in the
	// `cacheHostOrigin` form: http://<gateway>/<path>?cacheHostOrigin=<origin>.
	URLs []string `json:"urls"`
	// Concurrency is how many URLs are fetched at once. Default: 4;
	// at most 16.
	Concurrency int `json:"concurrency,omitempty"`
}

// prefetchResult is one line of POST /mcc/prefetch's answer, written as
// each URL finishes.
type prefetchResult struct {
	Index       int    `json:"index"` // in the request's urls
	URL         string `json:"url"`
	Status      int    `json:"status,omitempty"`
	Bytes       int64  `json:"bytes"`
	CacheStatus string `json:"cache_status,omitempty"`
	Error       string `json:"error,omitempty"`
}

// Prefetch limits.
const (
	defaultPrefetchConcurrency = 4
	maxPrefetchConcurrency     = 16
	maxPrefetchBody            = 8 << 20
)

// handlePrefetch downloads each URL from the gateway's own listener,
// discarding the bodies, so that every byte goes through the mcc handler
// and its reverse_proxy exactly as a client's download would, and fills
// the cache. The answer streams one JSON line per URL as it finishes
// (application/x-ndjson), in completion order.
func (adminAPI) handlePrefetch(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return methodNotAllowed(w, r, "POST")
	}
	var req prefetchRequest
	if err := decodeBody(r, &req, maxPrefetchBody); err != nil {
		return err
	}
	if len(req.URLs) == 0 {
		return badRequest("urls is empty")
	}
	workers := req.Concurrency
	if workers == 0 {
		workers = defaultPrefetchConcurrency
	}
	if workers < 0 || workers > maxPrefetchConcurrency {
		return badRequest("concurrency must be from 1 to %d", maxPrefetchConcurrency)
	}
	client, err := gatewayClient()
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
	}
	defer client.CloseIdleConnections()

	rc := http.NewResponseController(w)
	// The admin server's ReadTimeout would otherwise end the request's
	// context mid-download, through net/http's background read.
	rc.SetReadDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	rc.Flush()

	ctx := r.Context()
	jobs := make(chan int)
	results := make(chan prefetchResult)
	var wg sync.WaitGroup
	for range min(workers, len(req.URLs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				results <- safePrefetch(ctx, client, i, req.URLs[i])
			}
		}()
	}
	go func() {
		defer close(jobs)
		for i := range req.URLs {
			select {
			case jobs <- i:
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() {
		wg.Wait()
		close(results)
	}()
	enc := json.NewEncoder(w)
	var werr error
	for res := range results {
		// After a failed write (the client left) the results are
		// drained; the request's context stops the rest.
		if werr == nil {
			if werr = enc.Encode(res); werr == nil {
				rc.Flush()
			}
		}
	}
	return nil
}

// safePrefetch is prefetchOne that reports a panic as that URL's error
// instead of taking the process down.
func safePrefetch(ctx context.Context, client *http.Client, i int, raw string) (res prefetchResult) {
	defer func() {
		if v := recover(); v != nil {
			caddy.Log().Named("http.handlers.mcc").Error("panic in a prefetch", zap.String("url", raw), zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
			res = prefetchResult{Index: i, URL: raw, Error: fmt.Sprintf("panic: %v", v)}
		}
	}()
	return prefetchOne(ctx, client, i, raw)
}

// prefetchOne downloads one URL and reports how it went.
func prefetchOne(ctx context.Context, client *http.Client, i int, raw string) prefetchResult {
	res := prefetchResult{Index: i, URL: raw}
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		res.Error = err.Error()
		return res
	case u.Scheme != "http" && u.Scheme != "https":
		res.Error = "not an http or https URL"
		return res
	case u.Host == "" || u.User != nil:
		res.Error = "URL must name the gateway's host and no user"
		return res
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	req.Header.Set("User-Agent", "caddy-mcc-prefetch")
	resp, err := client.Do(req)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer resp.Body.Close()
	res.Status = resp.StatusCode
	res.CacheStatus = resp.Header.Get("Cache-Status")
	res.Bytes, err = io.Copy(io.Discard, resp.Body)
	switch {
	case err != nil:
		res.Error = err.Error()
	case resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent:
		res.Error = resp.Status
	}
	return res
}

// gatewayClient returns an HTTP client that connects only to this Caddy's
// own HTTP listeners: to an address of this machine, on a port that a
// server of the running config listens on. Prefetch URLs must point at the
// gateway; the admin API will not fetch from anywhere else for them.
func gatewayClient() (*http.Client, error) {
	ports, err := listenerPorts()
	if err != nil {
		return nil, err
	}
	locals, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	local := func(ip net.IP) bool {
		if ip.IsLoopback() {
			return true
		}
		for _, a := range locals {
			if n, ok := a.(*net.IPNet); ok && n.IP.Equal(ip) {
				return true
			}
		}
		return false
	}
	dialer := &net.Dialer{
		Timeout: 10 * time.Second,
		// Control sees the address actually dialled, after name
		// resolution, so a name cannot lead elsewhere.
		Control: func(_, address string, _ syscall.RawConn) error {
			host, portStr, err := net.SplitHostPort(address)
			if err != nil {
				return err
			}
			ip := net.ParseIP(host)
			port, err := strconv.ParseUint(portStr, 10, 16)
			if ip == nil || err != nil || !local(ip) {
				return fmt.Errorf("%s is not an address of this gateway", address)
			}
			for _, p := range ports {
				if uint(port) >= p[0] && uint(port) <= p[1] {
					return nil
				}
			}
			return fmt.Errorf("port %d is not a port this gateway's HTTP servers listen on", port)
		},
	}
	return &http.Client{
		Transport: &http.Transport{
			DialContext:         dialer.DialContext,
			DisableCompression:  true, // count and store the bytes as they are
			MaxIdleConnsPerHost: maxPrefetchConcurrency,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}, nil
}

// listenerPorts returns the port ranges the running config's HTTP servers
// listen on.
func listenerPorts() ([][2]uint, error) {
	app, err := caddy.ActiveContext().AppIfConfigured("http")
	if err != nil {
		return nil, fmt.Errorf("no HTTP server to prefetch through: %w", err)
	}
	httpApp, ok := app.(*caddyhttp.App)
	if !ok {
		return nil, errors.New("no HTTP server to prefetch through")
	}
	repl := caddy.NewReplacer()
	var ports [][2]uint
	for _, srv := range httpApp.Servers {
		for _, l := range srv.Listen {
			na, err := caddy.ParseNetworkAddress(repl.ReplaceKnown(l, ""))
			if err != nil || na.IsUnixNetwork() || na.IsFdNetwork() {
				continue
			}
			ports = append(ports, [2]uint{na.StartPort, na.EndPort})
		}
	}
	return ports, nil
}

// Interface guards
var _ caddy.AdminRouter = adminAPI{}
