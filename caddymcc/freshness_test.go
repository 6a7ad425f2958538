package caddymcc

import (
	"fmt"
	"testing"
	"time"

	"github.com/caddy-mcc/caddy-mcc/rangestore"
)

// freshMeta is the metadata of an object stored at 2026-01-01 00:00:00 UTC
// with the given headers; metaAge and metaDate go to the bookkeeping.
func freshMeta(kv ...string) rangestore.Meta {
	m := rangestore.Meta{Header: map[string][]string{}, Internal: map[string]string{metaStored: "1767225600"}}
	for i := 0; i+1 < len(kv); i += 2 {
		switch kv[i] {
		case metaAge, metaDate:
			m.Internal[kv[i]] = kv[i+1]
		default:
			m.Header[kv[i]] = append(m.Header[kv[i]], kv[i+1])
		}
	}
	return m
}

func TestLifetimeCapsDeltaSecondsAt2To31(t *testing.T) {
	h := &Handler{indexTTL: defaultIndexTTL}
	const capped = time.Duration(1<<31) * time.Second
	cases := []struct {
		name string
		m    rangestore.Meta
		ttl  time.Duration
	}{
		{"max-age 2^31", freshMeta("Cache-Control", "max-age=2147483648"), capped},
		{"max-age 2^31+1", freshMeta("Cache-Control", "max-age=2147483649"), capped},
		{"max-age beyond int64", freshMeta("Cache-Control", "max-age=99999999999999999999999"), capped},
		{"max-age 10^10 (overflows a Duration in seconds)", freshMeta("Cache-Control", "max-age=10000000000"), capped},
		{"s-maxage beyond int64", freshMeta("Cache-Control", "s-maxage=99999999999999999999999, max-age=5"), capped},
		{"quoted max-age", freshMeta("Cache-Control", `max-age="600"`), 600 * time.Second},
		{"huge age", freshMeta("Cache-Control", "max-age=600", metaAge, "99999999999999999999"), 600*time.Second - capped},
		{"both huge", freshMeta("Cache-Control", "max-age=99999999999999999999", metaAge, "99999999999999999999"), 0},
		{"negative age ignored", freshMeta("Cache-Control", "max-age=600", metaAge, "-500"), 600 * time.Second},
		{"garbage age ignored", freshMeta("Cache-Control", "max-age=600", metaAge, "soon"), 600 * time.Second},
		// Invalid freshness is stale (RFC 9111 section 4.2.1), not absent.
		{"negative max-age", freshMeta("Cache-Control", "max-age=-1"), 0},
		{"signed max-age", freshMeta("Cache-Control", "max-age=+600"), 0},
		{"fractional max-age", freshMeta("Cache-Control", "max-age=1.5"), 0},
		{"max-age without value", freshMeta("Cache-Control", "max-age"), 0},
		{"expires far after date", freshMeta("Expires", "Fri, 31 Dec 9999 23:59:59 GMT", metaDate, "Mon, 01 Jan 0001 00:00:00 GMT"), capped},
		{"expires far before date", freshMeta("Expires", "Mon, 01 Jan 0001 00:00:00 GMT", metaDate, "Fri, 31 Dec 9999 23:59:59 GMT", metaAge, "99999999999"), -2 * capped},
	}
	for _, c := range cases {
		ttl, expires := h.freshnessLifetime(c.m, "/f.swu")
		if ttl != c.ttl || !expires {
			t.Errorf("%s: lifetime %s, expires %v; want %s, true", c.name, ttl, expires, c.ttl)
		}
	}
}

// TestHugeMaxAgeIsFreshNotExpired: an object whose max-age
// overflowed used to be "always stale" from the start; capped, it is fresh.
func TestHugeMaxAgeIsFreshNotExpired(t *testing.T) {
	h := &Handler{indexTTL: defaultIndexTTL}
	ttl, _ := h.freshnessLifetime(freshMeta("Cache-Control", "max-age=9223372036854775807"), "/f.swu")
	stored := time.Unix(1767225600, 0)
	if exp := stored.Add(ttl); !exp.After(stored.Add(50 * 365 * 24 * time.Hour)) {
		t.Errorf("max-age=2^63-1 expires at %s, want about 68 years after it was stored", exp)
	}
}

func TestValidationsArePrunedToStoredKeys(t *testing.T) {
	store, err := rangestore.Open(t.TempDir(), rangestore.Options{BlockSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	c := &cache{store: store, validated: validations{m: make(map[uint64]time.Time)}}
	create := func(key string) *rangestore.Object {
		t.Helper()
		obj, err := store.Create(key, rangestore.Meta{Length: 1, ETag: `"` + key + `"`})
		if err != nil {
			t.Fatal(err)
		}
		return obj
	}

	// A key revalidated again and again holds one entry, its last version.
	for i := 0; i < 3; i++ {
		obj := create("origin.test/InRelease")
		c.markValidated(obj)
		obj.Invalidate()
		obj.Close()
	}
	if n := len(c.validated.m); n != 1 {
		t.Fatalf("three versions of one key hold %d entries, want 1", n)
	}

	// Many keys validated and then evicted or purged: the map is pruned
	// back to what is still stored once it reaches its threshold.
	kept := create("origin.test/kept")
	c.markValidated(kept)
	defer kept.Close()
	for i := 0; i < 3*pruneValidations; i++ {
		obj := create(fmt.Sprintf("origin.test/gone/%d", i))
		c.markValidated(obj)
		obj.Invalidate()
		obj.Close()
	}
	c.validated.mu.Lock()
	n := len(c.validated.m)
	_, keptOK := c.validated.m[kept.ID()]
	c.validated.mu.Unlock()
	if n > pruneValidations {
		t.Errorf("%d entries after %d keys came and went, want at most %d", n, 3*pruneValidations, pruneValidations)
	}
	if !keptOK {
		t.Error("the validation of a key still stored was pruned")
	}
}
