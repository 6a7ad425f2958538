package caddymcc

import (
	"bytes"
	"io"
	"net/http"
	"testing"
)

// Tests in this file pin downloads that go on uncached when the store will
// not take their blocks (issue 10, points 9 and 10).

// TestFullBudgetStreamsUncachedInsteadOfFailing: an object larger than
// the disk budget, whose stored blocks its own download holds, once cut the
// download (and every other miss got 502) when nothing was left to evict.
func TestFullBudgetStreamsUncachedInsteadOfFailing(t *testing.T) {
	o := newOrigin(t)
	big := o.add("/big.swu", 640*kib, 130)
	other := o.add("/other.swu", 100*kib, 131)
	g := startGateway(t, o, "max_size 256KiB")
	c := cacheOf(t, g)
	if code, body, _ := getWith(t, g, "/big.swu"); code != 200 || !bytes.Equal(body, big) {
		t.Fatalf("an object larger than the budget: %d, %d bytes, equal %v", code, len(body), bytes.Equal(body, big))
	}
	if c.stats.uncachedStreams.Load() == 0 {
		t.Error("no download was counted as streamed uncached")
	}
	download(t, g, "/other.swu", "origin.test", other, csMiss)
	if code, body, _ := getWith(t, g, "/big.swu"); code != 200 || !bytes.Equal(body, big) {
		t.Errorf("again: %d, equal %v", code, bytes.Equal(body, big))
	}
}

// TestPurgeMidDownloadDoesNotCutIt: README promises that clients reading a
// purged object finish undisturbed.
func TestPurgeMidDownloadDoesNotCutIt(t *testing.T) {
	for _, how := range []string{"purge", "delete"} {
		t.Run(how, func(t *testing.T) {
			o := newOrigin(t)
			want := o.add("/p.swu", 640*kib, 132)
			g := startGateway(t, o, "")
			release := newGate(t)
			o.holdAfter(100*kib, release)
			resp, done := getOwnConn(t, g, "/p.swu", "origin.test")
			defer done()
			defer resp.Body.Close()
			got := make([]byte, 50*kib)
			if _, err := io.ReadFull(resp.Body, got); err != nil {
				t.Fatal(err)
			}
			if how == "purge" {
				var res struct{ Purged int }
				adminJSON(t, g, http.MethodPost, "/mcc/purge", purgeRequest{Origin: "origin.test"}, &res)
				if res.Purged != 1 {
					t.Fatalf("purged %d objects", res.Purged)
				}
			} else if code, body := adminCall(t, g, http.MethodDelete, "/mcc/objects?key=origin.test/p.swu", nil); code != 200 {
				t.Fatalf("DELETE: %d %s", code, body)
			}
			release.open()
			rest, err := io.ReadAll(resp.Body)
			if err != nil || !bytes.Equal(append(got, rest...), want) {
				t.Fatalf("the download after a %s: %v, %d bytes, equal %v", how, err, len(got)+len(rest), bytes.Equal(append(got, rest...), want))
			}
		})
	}
}
