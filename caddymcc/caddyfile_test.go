package caddymcc

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func int64p(n int64) *int64 { return &n }

// TestUnmarshalCaddyfileSetsEverySubdirective parses each subdirective, the
// size notations and repeated origins lines into the Handler's JSON fields.
func TestUnmarshalCaddyfileSetsEverySubdirective(t *testing.T) {
	cases := []struct {
		name  string
		input string
		want  Handler
	}{
		{"bare directive", "mcc", Handler{}},
		{"empty block", "mcc {\n}", Handler{}},
		{"all subdirectives", `mcc {
			dir          /var/cache/mcc
			max_size     50GiB
			min_free     2GiB
			block_size   1MiB
			origins      *.nlu.dl.adu.microsoft.com au.download.windowsupdate.com
			read_ahead   16MiB
			fill_timeout 45s
			name         edge-1
		}`, Handler{
			Dir:         "/var/cache/mcc",
			MaxSize:     50 << 30,
			MinFree:     int64p(2 << 30),
			BlockSize:   1 << 20,
			Origins:     []string{"*.nlu.dl.adu.microsoft.com", "au.download.windowsupdate.com"},
			ReadAhead:   16 << 20,
			FillTimeout: caddy.Duration(45 * time.Second),
			Name:        "edge-1",
		}},
		{"KiB block size", "mcc {\n block_size 64KiB\n}", Handler{BlockSize: 64 << 10}},
		{"max_object_size", "mcc {\n max_object_size 4GiB\n}", Handler{MaxObjectSize: 4 << 30}},
		{"max_fills", "mcc {\n max_fills 8\n}", Handler{MaxFills: 8}},
		{"lower-case IEC unit", "mcc {\n block_size 64kib\n}", Handler{BlockSize: 64 << 10}},
		{"SI units are decimal", "mcc {\n max_size 500MB\n read_ahead 64k\n}", Handler{MaxSize: 500_000_000, ReadAhead: 64_000}},
		{"fractional size", "mcc {\n max_size 1.5GiB\n}", Handler{MaxSize: 3 << 29}},
		{"plain byte counts", "mcc {\n max_size 1073741824\n block_size 65536\n}", Handler{MaxSize: 1 << 30, BlockSize: 1 << 16}},
		{"min_free 0 is kept, not defaulted", "mcc {\n min_free 0\n}", Handler{MinFree: int64p(0)}},
		{"day durations", "mcc {\n fill_timeout 1d\n}", Handler{FillTimeout: caddy.Duration(24 * time.Hour)}},
		{"repeated origins lines add up", `mcc {
			origins a.test
			origins *.b.test c.test
			origins Upper.Case.TEST
		}`, Handler{Origins: []string{"a.test", "*.b.test", "c.test", "Upper.Case.TEST"}}},
		{"quoted dir with a space", "mcc {\n dir \"/srv/mcc store\"\n}", Handler{Dir: "/srv/mcc store"}},
		{"later line wins", "mcc {\n name a\n name b\n}", Handler{Name: "b"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var h Handler
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(c.input)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if !reflect.DeepEqual(h, c.want) {
				t.Errorf("got  %+v\nwant %+v", describe(h), describe(c.want))
			}
		})
	}
}

// describe renders a Handler's configuration with MinFree dereferenced,
// for failure messages.
func describe(h Handler) string {
	b, _ := json.Marshal(h)
	return string(b)
}

// TestUnmarshalCaddyfileRejectsBadInput checks that every malformed
// Caddyfile is an error that names the problem, so a typo never becomes a
// silently different cache.
func TestUnmarshalCaddyfileRejectsBadInput(t *testing.T) {
	cases := []struct {
		name, input, wantErr string
	}{
		{"unknown subdirective", "mcc {\n cache_dir /x\n}", `unknown mcc subdirective "cache_dir"`},
		{"argument on the directive", "mcc /var/cache/mcc", "wrong argument count"},
		{"argument on the directive with a block", "mcc /x {\n dir /y\n}", "wrong argument count"},
		{"dir without path", "mcc {\n dir\n}", "wrong argument count"},
		{"max_size without size", "mcc {\n max_size\n}", "wrong argument count"},
		{"min_free without size", "mcc {\n min_free\n}", "wrong argument count"},
		{"block_size without size", "mcc {\n block_size\n}", "wrong argument count"},
		{"read_ahead without size", "mcc {\n read_ahead\n}", "wrong argument count"},
		{"origins without hosts", "mcc {\n origins\n}", "wrong argument count"},
		{"fill_timeout without duration", "mcc {\n fill_timeout\n}", "wrong argument count"},
		{"name without token", "mcc {\n name\n}", "wrong argument count"},
		{"two dirs", "mcc {\n dir /a /b\n}", "wrong argument count"},
		{"size split from its unit", "mcc {\n max_size 50 GiB\n}", "wrong argument count"},
		{"two sizes", "mcc {\n block_size 1MiB 2MiB\n}", "wrong argument count"},
		{"two durations", "mcc {\n fill_timeout 1s 2s\n}", "wrong argument count"},
		{"two names", "mcc {\n name a b\n}", "wrong argument count"},
		{"size that is no size", "mcc {\n max_size lots\n}", "max_size:"},
		{"unknown unit", "mcc {\n block_size 1MiBB\n}", "block_size:"},
		{"duration that is no duration", "mcc {\n fill_timeout soon\n}", "fill_timeout:"},
		{"origin with userinfo", "mcc {\n origins a@b.com\n}", `"a@b.com"`},
		{"wildcard without suffix", "mcc {\n origins *.\n}", `"*."`},
		{"bare wildcard", "mcc {\n origins *\n}", `"*"`},
		{"wildcard inside", "mcc {\n origins *.*.test\n}", `"*.*.test"`},
		{"origin with port", "mcc {\n origins a.test:80\n}", `"a.test:80"`},
		{"origin as URL", "mcc {\n origins http://a.test\n}", `"http://a.test"`},
		{"origin with trailing dot", "mcc {\n origins a.test.\n}", `"a.test."`},
		{"origin with empty label", "mcc {\n origins a..test\n}", `"a..test"`},
		{"origin label starting with hyphen", "mcc {\n origins -a.test\n}", `"-a.test"`},
		{"one bad origin among good ones", "mcc {\n origins a.test b@c.test d.test\n}", `"b@c.test"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(c.input))
			if err == nil {
				t.Fatalf("no error; parsed %s", describe(h))
			}
			if !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("error %q does not mention %q", err, c.wantErr)
			}
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Errorf("error %q does not give the Caddyfile position", err)
			}
		})
	}
}

// TestValidateRejectsNegativeSizesAndBadNames covers what the Caddyfile
// syntax accepts but the configuration does not: a negative byte count and
// a cache name that cannot stand in a Cache-Status header.
func TestValidateRejectsNegativeSizesAndBadNames(t *testing.T) {
	for _, input := range []string{
		"mcc {\n max_size -1\n}",
		"mcc {\n min_free -1\n}",
		"mcc {\n read_ahead -1\n}",
		"mcc {\n fill_timeout -1s\n}",
		"mcc {\n name a/b\n}",
		"mcc {\n name \"\"\n}",
	} {
		h := Handler{Name: "caddy-mcc"}
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			t.Errorf("%q: UnmarshalCaddyfile: %v", input, err)
			continue
		}
		if err := h.Validate(); err == nil {
			t.Errorf("%q: Validate accepted %s", input, describe(h))
		}
	}
	good := Handler{Name: "edge-1", MaxSize: 1, MinFree: int64p(0)}
	if err := good.Validate(); err != nil {
		t.Errorf("Validate(%s): %v", describe(good), err)
	}
}

// TestValidateNamesTheWrongField checks that Validate's error names the
// subdirective to fix, not a group of them.
func TestValidateNamesTheWrongField(t *testing.T) {
	neg := int64(-1)
	for field, h := range map[string]Handler{
		"max_size":       {MaxSize: -1},
		"min_free":       {MinFree: &neg},
		"read_ahead":     {ReadAhead: -1},
		"fill_timeout":   {FillTimeout: -1},
		"max_levels":     {MaxLevels: -1},
		"max_fills":      {MaxFills: -1},
		"index_ttl":      {IndexTTL: -1},
		"stale_if_error": {StaleIfError: -1},
	} {
		h.Name = "caddy-mcc"
		err := h.Validate()
		if want := "mcc: " + field + " must not be negative"; err == nil || err.Error() != want {
			t.Errorf("Validate(%s) = %v, want %q", describe(h), err, want)
		}
	}
}

// adaptCaddyfile adapts a Caddyfile to JSON as `caddy adapt` does.
func adaptCaddyfile(t *testing.T, src string) []byte {
	t.Helper()
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting Caddyfile: %v", err)
	}
	for _, w := range warnings {
		t.Logf("caddyfile: %s", w.String())
	}
	return cfg
}

// jsonRoute is a route of Caddy's HTTP app.
type jsonRoute struct {
	Handle []json.RawMessage `json:"handle"`
}

// routeHandlers lists the handler objects of routes in the order a request
// meets them, descending into subroutes.
func routeHandlers(t *testing.T, routes []jsonRoute) []json.RawMessage {
	t.Helper()
	var out []json.RawMessage
	for _, r := range routes {
		for _, raw := range r.Handle {
			var h struct {
				Handler string      `json:"handler"`
				Routes  []jsonRoute `json:"routes"`
			}
			if err := json.Unmarshal(raw, &h); err != nil {
				t.Fatalf("handler %s: %v", raw, err)
			}
			out = append(out, raw)
			if h.Handler == "subroute" {
				out = append(out, routeHandlers(t, h.Routes)...)
			}
		}
	}
	return out
}

func handlerName(t *testing.T, raw json.RawMessage) string {
	t.Helper()
	var h struct {
		Handler string `json:"handler"`
	}
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatal(err)
	}
	return h.Handler
}

// decodeHandlerJSON decodes a handler object as Caddy loads a module: the
// "handler" key names the module and is dropped, and any other unknown
// field is an error.
func decodeHandlerJSON(t *testing.T, raw json.RawMessage) Handler {
	t.Helper()
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		t.Fatal(err)
	}
	delete(fields, "handler")
	b, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}
	var h Handler
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return h
}

// TestDirectiveOrderPutsMccAfterRewriteBeforeReverseProxy adapts a site
// block that lists reverse_proxy first, then mcc, then rewrite, and checks
// that requests meet rewrite, then mcc, then reverse_proxy: the registered
// directive order, not the order written, decides.
func TestDirectiveOrderPutsMccAfterRewriteBeforeReverseProxy(t *testing.T) {
	cfg := adaptCaddyfile(t, `{
	admin off
	auto_https off
}
http://:8080 {
	reverse_proxy 127.0.0.1:9 {
		rewrite {http.mcc.origin_uri}
		header_up Host {http.mcc.origin_host}
	}
	mcc {
		dir /var/cache/mcc
		max_size 50GiB
		origins origin.test
	}
	rewrite /old /new
}
`)
	var doc struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Routes []jsonRoute `json:"routes"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfg, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Apps.HTTP.Servers) != 1 {
		t.Fatalf("%d servers in %s", len(doc.Apps.HTTP.Servers), cfg)
	}
	var names []string
	var mcc json.RawMessage
	for _, srv := range doc.Apps.HTTP.Servers {
		for _, raw := range routeHandlers(t, srv.Routes) {
			name := handlerName(t, raw)
			if name == "subroute" {
				continue
			}
			names = append(names, name)
			if name == "mcc" {
				mcc = raw
			}
		}
	}
	if want := []string{"rewrite", "mcc", "reverse_proxy"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("handlers in order %v, want %v\nconfig: %s", names, want, cfg)
	}
	got := decodeHandlerJSON(t, mcc)
	want := Handler{Dir: "/var/cache/mcc", MaxSize: 50 << 30, Origins: []string{"origin.test"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("adapted mcc handler %s, want %s", describe(got), describe(want))
	}
}

// TestHandlerJSONRoundTrip checks the JSON field names of the handler's
// configuration and that every field survives encoding and decoding,
// including a zero min_free, which differs from an absent one.
func TestHandlerJSONRoundTrip(t *testing.T) {
	h := Handler{
		Dir:         "/var/cache/mcc",
		MaxSize:     50 << 30,
		MinFree:     int64p(0),
		BlockSize:   1 << 20,
		Origins:     []string{"*.nlu.dl.adu.microsoft.com", "au.download.windowsupdate.com"},
		ReadAhead:   16 << 20,
		FillTimeout: caddy.Duration(45 * time.Second),
		Name:        "edge-1",
	}
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"dir":"/var/cache/mcc","max_size":53687091200,"min_free":0,"block_size":1048576,` +
		`"origins":["*.nlu.dl.adu.microsoft.com","au.download.windowsupdate.com"],` +
		`"read_ahead":16777216,"fill_timeout":45000000000,"name":"edge-1"}`
	if string(b) != want {
		t.Errorf("JSON\n got %s\nwant %s", b, want)
	}
	got := decodeHandlerJSON(t, append([]byte(`{"handler":"mcc",`), b[1:]...))
	if !reflect.DeepEqual(got, h) {
		t.Errorf("round trip gave %s, want %s", describe(got), describe(h))
	}

	// Zero values are left out, so an empty config is an empty object.
	if b, _ := json.Marshal(Handler{}); string(b) != "{}" {
		t.Errorf("empty handler encodes as %s", b)
	}
	// Caddy durations are also written as strings in hand-made JSON.
	got = decodeHandlerJSON(t, json.RawMessage(`{"handler":"mcc","fill_timeout":"1m30s"}`))
	if time.Duration(got.FillTimeout) != 90*time.Second {
		t.Errorf(`"fill_timeout":"1m30s" decoded as %v`, time.Duration(got.FillTimeout))
	}
}

// TestDefaultOriginsAllowDeviceUpdateHosts classifies requests against the
// parsed DefaultOrigins: the Device Update content hosts under each
// wildcard and Microsoft's smoke-test host are served, by cacheHostOrigin
// or by Host header, and look-alikes are refused.
func TestDefaultOriginsAllowDeviceUpdateHosts(t *testing.T) {
	var allowed []originPattern
	for _, s := range DefaultOrigins {
		p, err := parseOriginPattern(s)
		if err != nil {
			t.Fatalf("DefaultOrigins entry %q: %v", s, err)
		}
		allowed = append(allowed, p)
	}
	const path = "/filestreamingservice/files/0a1b2c3d/pieceshash"
	served := []struct {
		target, host, origin, uri string
	}{
		{path + "?cacheHostOrigin=x.b.nlu.dl.adu.microsoft.com", "gw", "x.b.nlu.dl.adu.microsoft.com", path},
		{path + "?cacheHostOrigin=instance.tlu.dl.adu.microsoft.com", "gw", "instance.tlu.dl.adu.microsoft.com", path},
		{path + "?cacheHostOrigin=a.b.dcsfe.prod.adu.microsoft.com", "gw", "a.b.dcsfe.prod.adu.microsoft.com", path},
		{"/mscomtest/wuidt.gif?cacheHostOrigin=au.download.windowsupdate.com", "gw", "au.download.windowsupdate.com", "/mscomtest/wuidt.gif"},
		{"/mscomtest/wuidt.gif?cacheHostOrigin=AU.Download.WindowsUpdate.com", "gw", "au.download.windowsupdate.com", "/mscomtest/wuidt.gif"},
		{path + "?P1=1&cacheHostOrigin=x.nlu.dl.adu.microsoft.com&P2=a%2Fb", "gw", "x.nlu.dl.adu.microsoft.com", path + "?P1=1&P2=a%2Fb"},
		// Configuration Manager's form: the origin in the Host header.
		{"/mscomtest/wuidt.gif", "au.download.windowsupdate.com", "au.download.windowsupdate.com", "/mscomtest/wuidt.gif"},
		{path, "x.nlu.dl.adu.microsoft.com:80", "x.nlu.dl.adu.microsoft.com", path},
	}
	for _, c := range served {
		r := httptest.NewRequest("GET", c.target, nil)
		r.Host = c.host
		req, err := classify(r, allowed)
		if err != nil {
			t.Errorf("GET %s (Host %s) refused: %v", c.target, c.host, err)
			continue
		}
		if req.origin != c.origin || req.uri != c.uri || req.key != c.origin+c.uri {
			t.Errorf("GET %s (Host %s) = %+v, want origin %s uri %s", c.target, c.host, req, c.origin, c.uri)
		}
	}
	refused := []struct{ target, host string }{
		{path + "?cacheHostOrigin=nlu.dl.adu.microsoft.com", "gw"}, // the suffix itself
		{path + "?cacheHostOrigin=x.nlu.dl.adu.microsoft.com.evil.test", "gw"},
		{path + "?cacheHostOrigin=xnlu.dl.adu.microsoft.com", "gw"},
		{path + "?cacheHostOrigin=download.windowsupdate.com", "gw"},
		{path + "?cacheHostOrigin=x.au.download.windowsupdate.com", "gw"}, // exact, not a wildcard
		{path + "?cacheHostOrigin=x.nlu.dl.adu.microsoft.com%40evil.test", "gw"},
		{path + "?cacheHostOrigin=x.nlu.dl.adu.microsoft.com:80", "gw"},
		{path + "?cacheHostOrigin=www.microsoft.com", "gw"},
		{path + "?cacheHostOrigin=x.nlu.dl.adu.microsoft.com&cacheHostOrigin=au.download.windowsupdate.com", "gw"},
		{path, "gw"},
		{path, "127.0.0.1"},
	}
	for _, c := range refused {
		r := httptest.NewRequest("GET", c.target, nil)
		r.Host = c.host
		if req, err := classify(r, allowed); err == nil {
			t.Errorf("GET %s (Host %s) allowed as %+v", c.target, c.host, req)
		}
	}
}

// TestRefusedReloadLeavesTheRunningStoreAlone: Caddy validates a config
// after provisioning it, and the store is shared with the running config:
// a reload with a negative max_fills is refused before it reaches the
// store's fill queue, and fills go on.
func TestRefusedReloadLeavesTheRunningStoreAlone(t *testing.T) {
	o := newOrigin(t)
	want := o.add("/after.swu", 300*kib, 97)
	g := startGateway(t, o, "")
	// Only JSON can say it: the Caddyfile refuses it while parsing.
	bad := bytes.Replace(g.config(o, gatewayPort(g), "max_fills 7"), []byte(`"max_fills":7`), []byte(`"max_fills":-1`), 1)
	if err := caddy.Load(bad, true); err == nil || !strings.Contains(err.Error(), "max_fills") {
		t.Fatalf("reload with max_fills -1: %v, want it refused naming max_fills", err)
	}
	if n := cacheOf(t, g).queue.limit; n != defaultMaxFills {
		t.Fatalf("the running store's fill limit is %d after the refused reload, want %d", n, defaultMaxFills)
	}
	download(t, g, "/after.swu", "origin.test", want, csMiss)
}
