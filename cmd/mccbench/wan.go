package main

import (
	"fmt"
	"sync"
	"time"
)

// The wan scenario's link to the origin: 50 ms each way (100 ms per
// request round trip) and 100 Mbit/s each way, shared by every connection.
const (
	wanDelay   = 50 * time.Millisecond
	wanRate    = int64(100_000_000 / 8) // bytes per second
	wanDevices = 10
)

// wanDevicesRow is the table row of the ten devices.
var wanDevicesRow = fmt.Sprintf("wan %d devices, × link", wanDevices)

// scenarioWAN: the origin is behind a slow, distant link. One device
// downloads a new object, then ten devices each download a different new
// object at once, through caddy-mcc, through nginx's slice cache, and
// straight over the link. The figure is the aggregate throughput achieved
// as a share of the link's rate.
func (b *bench) scenarioWAN() error {
	wan, err := startLink(b.origin.addr, wanDelay, wanRate)
	if err != nil {
		return err
	}
	defer wan.close()
	mcc, err := startCaddy("wan-caddy-mcc", b.caddyBin, caddyMCCConfig, b.base, wan.addr, mccQuery)
	if err != nil {
		return err
	}
	defer mcc.stop()
	slice, err := startNginx("wan-nginx-slice", b.nginxBin, nginxSliceConfig, b.base, wan.addr)
	if err != nil {
		return err
	}
	defer slice.stop()
	targets := []*server{
		{name: "caddy-mcc", url: mcc.url, query: mccQuery},
		{name: "nginx-slice", url: slice.url},
		{name: "direct", url: "http://" + wan.addr},
	}
	mccChain, sliceChain, err := b.startChains("wanchain", wan.addr)
	if err != nil {
		return err
	}
	defer mccChain.stop()
	defer sliceChain.stop()
	chains := []*server{
		{name: "caddy-mcc", url: mccChain.levels[0].url, query: mccQuery},
		{name: "nginx-slice", url: sliceChain.levels[0].url},
		{name: "direct", url: "http://" + wan.addr},
	}
	link := float64(wanRate) / 1e6 // MB/s
	for r := 0; r < b.sz.wanRounds; r++ {
		// Three levels between the device and the link: one pipelined
		// stream through all of them runs at the link's rate.
		for _, s := range alternate(chains, r) {
			mbps, err := coldDownload(s, fmt.Sprintf("wanchain-%s-%d-%d", s.name, r, b.sz.wanChain))
			if err != nil {
				return fmt.Errorf("wan chain: %w", err)
			}
			b.record("wan chain, × link", s.name, mbps/link)
		}
		for _, s := range alternate(targets, r) {
			mbps, err := coldDownload(s, fmt.Sprintf("wan-%s-%d-%d", s.name, r, b.sz.wanOne))
			if err != nil {
				return fmt.Errorf("wan: %w", err)
			}
			b.record("wan 1 device, × link", s.name, mbps/link)
		}
		for _, s := range alternate(targets, r) {
			names := make([]string, wanDevices)
			for i := range names {
				names[i] = fmt.Sprintf("wan%d-%s-%d-%d-%d", wanDevices, s.name, r, i, b.sz.wanEach)
			}
			mbps, err := coldDownloads(s, names)
			if err != nil {
				return fmt.Errorf("wan: %w", err)
			}
			b.record(wanDevicesRow, s.name, mbps/link)
		}
	}
	return nil
}

// coldDownloads has one device per name download that object (new to s)
// at once, checks every SHA-256, and returns the aggregate MB/s: all bytes
// over the time until the last device finished.
func coldDownloads(s *server, names []string) (float64, error) {
	var wg sync.WaitGroup
	sums, ns, errs := make([]string, len(names)), make([]int64, len(names)), make([]error, len(names))
	quiesce()
	t0 := time.Now()
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sums[i], ns[i], errs[i] = download(newClient(1), s.url+"/obj/"+name+s.query)
		}()
	}
	wg.Wait()
	d := time.Since(t0)
	var total int64
	for i, name := range names {
		c, _ := objectFor("/obj/" + name)
		if want := contentSum(c); errs[i] != nil || ns[i] != c.size || sums[i] != want {
			return 0, fmt.Errorf("cold download of %s through %s: %d of %d bytes, %v, checksum match %v", name, s.name, ns[i], c.size, errs[i], sums[i] == want)
		}
		total += ns[i]
	}
	return float64(total) / d.Seconds() / 1e6, nil
}
