package caddymcc

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// Tests in this file pin several cache drives (drives.go).

func TestPlacementIsWeightedAndMovesLittle(t *testing.T) {
	h := &Handler{
		caches:  []*cache{{dir: "/cache1"}, {dir: "/cache2"}},
		weights: []float64{3 << 30, 1 << 30},
	}
	const n = 8000
	where := make([]*cache, n)
	first := 0
	for i := range where {
		where[i] = h.place(fmt.Sprintf("origin.test/obj-%d", i))
		if where[i] == h.caches[0] {
			first++
		}
	}
	if share := float64(first) / n; share < 0.72 || share > 0.78 {
		t.Errorf("the 3GiB drive holds %.3f of the objects, want about 0.75", share)
	}
	// A third drive takes objects only from the others, about its share.
	h.caches, h.weights = append(h.caches, &cache{dir: "/cache3"}), append(h.weights, 4<<30)
	moved := 0
	for i := range where {
		now := h.place(fmt.Sprintf("origin.test/obj-%d", i))
		if now != where[i] {
			moved++
			if now != h.caches[2] {
				t.Fatalf("object %d moved between the old drives", i)
			}
		}
	}
	if share := float64(moved) / n; share < 0.45 || share > 0.55 {
		t.Errorf("adding a drive of half the total weight moved %.3f of the objects, want about 0.5", share)
	}
	// A drive out of service gives its objects to the others, and only its.
	h.caches[2].down.Store(true)
	for i := range where {
		if now := h.place(fmt.Sprintf("origin.test/obj-%d", i)); now != where[i] {
			t.Fatalf("object %d is not back on its drive with the third one out of service", i)
		}
	}
}

// startDrivesGateway starts the harness gateway with two drives, weighted
// 3:1.
func startDrivesGateway(t *testing.T, o *testOrigin) *gateway {
	t.Helper()
	return startGatewayFrom(t, o, strings.Replace(gatewayConfig, "dir {{dir}}/store", "drive {{dir}}/d1 3GiB\n\t\tdrive {{dir}}/d2 1GiB", 1))
}

func TestTwoDrivesShareObjectsAndALostDriveFailsNoRequest(t *testing.T) {
	o := newOrigin(t)
	const n = 24
	wants := make([][]byte, n)
	for i := range wants {
		wants[i] = o.add(fmt.Sprintf("/d-%d.swu", i), 200*kib, uint64(300+i))
	}
	g := startDrivesGateway(t, o)
	d1, d2 := cacheAt(t, filepath.Join(g.dir, "d1")), cacheAt(t, filepath.Join(g.dir, "d2"))
	get := func(i int) {
		if code, body, _ := getWith(t, g, fmt.Sprintf("/d-%d.swu", i)); code != 200 || !bytes.Equal(body, wants[i]) {
			t.Errorf("object %d: %d, equal %v", i, code, bytes.Equal(body, wants[i]))
		}
	}
	for i := range n {
		get(i)
	}
	g.waitFills()
	n1, n2 := d1.store.Stats().Objects, d2.store.Stats().Objects
	if n1+n2 != n || n2 == 0 || n1 <= n2 {
		t.Fatalf("objects on the drives: %d and %d, want all %d, more on the larger", n1, n2, n)
	}

	// The second drive goes away (its mount disappears) before its health
	// check notices: clients of its stored objects and of new ones placed
	// on it still get every byte.
	away := filepath.Join(g.dir, "d2.away")
	if err := os.Rename(filepath.Join(g.dir, "d2"), away); err != nil {
		t.Fatal(err)
	}
	more := make([][]byte, n)
	for i := range more {
		more[i] = o.add(fmt.Sprintf("/new-%d.swu", i), 200*kib, uint64(400+i))
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(2)
		go func() {
			defer wg.Done()
			get(i)
		}()
		go func() {
			defer wg.Done()
			if code, body, _ := getWith(t, g, fmt.Sprintf("/new-%d.swu", i)); code != 200 || !bytes.Equal(body, more[i]) {
				t.Errorf("new object %d with the drive gone: %d, equal %v", i, code, bytes.Equal(body, more[i]))
			}
		}()
	}
	wg.Wait()
	// The origin never failed: what the drive's fills met is the store's.
	if n := d2.stats.fillErrors[fillUpstream].Load(); n != 0 {
		t.Errorf("fills on the lost drive counted %d upstream errors (%d store errors); the origin never failed", n, d2.stats.fillErrors[fillStore].Load())
	}
	d2.checkHealth()
	if !d2.down.Load() {
		t.Fatal("the drive without its directory is still in service")
	}
	up := map[string]float64{}
	for _, m := range scrape(t, g)["caddy_mcc_drive_up"].GetMetric() {
		up[m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
	}
	if up[d1.dir] != 1 || up[d2.dir] != 0 {
		t.Errorf("caddy_mcc_drive_up = %v, want 1 for %s and 0 for %s", up, d1.dir, d2.dir)
	}
	for i := range n {
		get(i)
	}
	g.waitFills()
	if got := d1.store.Stats().Objects; got < n {
		t.Errorf("the first drive holds %d objects with the second out of service, want at least all %d old ones", got, n)
	}

	// The drive comes back (remounted): in service again, and its objects
	// are hits there.
	if err := os.Rename(away, filepath.Join(g.dir, "d2")); err != nil {
		t.Fatal(err)
	}
	d2.checkHealth()
	if d2.down.Load() {
		t.Fatal("the drive is back but still out of service")
	}
	hits := 0
	for i := range n {
		resp := g.get(fmt.Sprintf("/d-%d.swu", i), "origin.test")
		if body := readAll(t, resp); !bytes.Equal(body, wants[i]) {
			t.Errorf("object %d after the drive came back: not the origin's bytes", i)
		}
		if resp.Header.Get("Cache-Status") == csHit {
			hits++
		}
	}
	if hits != n {
		t.Errorf("%d of %d objects were hits after the drive came back", hits, n)
	}
}

// TestEveryDriveKeepsItsCounters: each drive's totals are saved when the
// cache stops, not only the first drive's.
func TestEveryDriveKeepsItsCounters(t *testing.T) {
	o := newOrigin(t)
	g := startDrivesGateway(t, o)
	// Looked up without findCache, which would start their ledgers.
	var d1, d2 *cache
	caches.Range(func(k, v any) bool {
		switch k {
		case filepath.Join(g.dir, "d1"):
			d1 = v.(*cache)
		case filepath.Join(g.dir, "d2"):
			d2 = v.(*cache)
		}
		return true
	})
	<-d1.ready
	<-d2.ready
	for i := 0; d1.store.Stats().Objects == 0 || d2.store.Stats().Objects == 0; i++ {
		want := o.add(fmt.Sprintf("/c-%d.swu", i), 100*kib, uint64(500+i))
		download(t, g, fmt.Sprintf("/c-%d.swu", i), "origin.test", want, csMiss)
		waitAllFills()
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"d1", "d2"} {
		b, err := os.ReadFile(filepath.Join(g.dir, d, counterFile))
		var saved totals
		if err == nil {
			err = json.Unmarshal(b, &saved)
		}
		if err != nil || saved.MissBytes == 0 {
			t.Errorf("drive %s: saved counters %+v, %v; want its miss bytes", d, saved, err)
		}
	}
}
