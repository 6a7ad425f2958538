package main

import (
	"fmt"
	"strings"
	"time"
)

// hopDelay is the one-way delay of the link between two gateway levels:
// every request that crosses a hop is answered 2 ms later.
const hopDelay = time.Millisecond

// chainLatency is what the origin adds to each answer in the chain
// scenario, as in scenario 5.
const chainLatency = 20 * time.Millisecond

// caddyMCCLevelConfig is one level of a caddy-mcc hierarchy: the same cache
// as caddyMCCConfig under its own name, forwarding misses unchanged to its
// parent (for the top, the origin).
var caddyMCCLevelConfig = strings.Replace(caddyMCCConfig, "\t\tmin_free 0\n", "\t\tmin_free 0\n\t\tname {{name}}\n", 1)

// hierarchy is three cache levels of one kind, each a process of its own,
// bottom → middle → top → origin. The bottom is what devices ask; each
// level reaches its parent through a link delaying hopDelay each way; the
// top reaches the origin directly.
type hierarchy struct {
	levels []*server // bottom first
	links  []*link
}

// startHierarchy starts the levels top first, the top's misses going to
// origin (host:port); start runs one level named name whose misses go to
// parent.
func (b *bench) startHierarchy(kind, origin string, start func(name, parent string) (*server, error)) (*hierarchy, error) {
	h := &hierarchy{}
	parent := origin
	for _, level := range []string{"top", "middle", "bottom"} {
		s, err := start("chain-"+kind+"-"+level, parent)
		if err != nil {
			h.stop()
			return nil, err
		}
		h.levels = append([]*server{s}, h.levels...)
		if level == "bottom" {
			break
		}
		hop, err := startLink(strings.TrimPrefix(s.url, "http://"), hopDelay, 0)
		if err != nil {
			h.stop()
			return nil, err
		}
		h.links = append(h.links, hop)
		parent = hop.addr
	}
	return h, nil
}

func (h *hierarchy) stop() {
	for _, s := range h.levels {
		s.stop()
	}
	for _, l := range h.links {
		l.close()
	}
}

// startChains starts a caddy-mcc and an nginx slice hierarchy whose tops
// reach the origin at origin; kind names them apart.
func (b *bench) startChains(kind, origin string) (mcc, slice *hierarchy, err error) {
	mcc, err = b.startHierarchy(kind+"-mcc", origin, func(name, parent string) (*server, error) {
		level := name[strings.LastIndex(name, "-")+1:]
		cfg := strings.ReplaceAll(caddyMCCLevelConfig, "{{name}}", level)
		return startCaddy(name, b.caddyBin, cfg, b.base, parent, mccQuery)
	})
	if err != nil {
		return nil, nil, err
	}
	slice, err = b.startHierarchy(kind+"-slice", origin, func(name, parent string) (*server, error) {
		return startNginx(name, b.nginxBin, nginxSliceConfig, b.base, parent)
	})
	if err != nil {
		mcc.stop()
		return nil, nil, err
	}
	return mcc, slice, nil
}

// scenarioChain: one device downloads a new object through three caddy-mcc
// levels, through three nginx slice levels, and straight from the origin,
// with the origin 20 ms away and 2 ms per hop between levels.
func (b *bench) scenarioChain() error {
	mcc, slice, err := b.startChains("chain", b.origin.addr)
	if err != nil {
		return err
	}
	defer mcc.stop()
	defer slice.stop()

	b.origin.latency.Store(int64(chainLatency))
	defer b.origin.latency.Store(0)
	targets := []*server{
		{name: "caddy-mcc", url: mcc.levels[0].url, query: mccQuery},
		{name: "nginx-slice", url: slice.levels[0].url},
		{name: "direct", url: "http://" + b.origin.addr},
	}
	for r := 0; r < b.sz.rounds; r++ {
		for _, s := range alternate(targets, r) {
			mbps, err := coldDownload(s, fmt.Sprintf("chain-%s-%d-%d", s.name, r, b.sz.chain))
			if err != nil {
				return fmt.Errorf("chain: %w", err)
			}
			b.record("chain MB/s", s.name, mbps)
		}
	}
	return nil
}
