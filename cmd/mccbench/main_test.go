package main

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// TestQuickRunPrintsEveryRow runs the whole benchmark in -quick mode, so
// the harness (servers, scenarios, checksums, table) cannot rot. It asserts
// no timings: only that every scenario ran, nothing failed, and the byte
// counts that are targets (the cold herd's, abandoned requests') are met.
func TestQuickRunPrintsEveryRow(t *testing.T) {
	if testing.Short() {
		t.Skip("builds Caddy and runs nginx")
	}
	if _, err := exec.LookPath("/usr/sbin/nginx"); err != nil {
		t.Skip("nginx is not installed (.ci/run installs it)")
	}
	var out strings.Builder
	if err := run([]string{"-quick"}, &out); err != nil {
		t.Fatal(err)
	}
	table := out.String()
	row := func(key string) string {
		for _, l := range strings.Split(table, "\n") {
			if strings.HasPrefix(l, "| "+key+" |") {
				return l
			}
		}
		return ""
	}
	for _, r := range rows {
		line := row(r.key)
		if line == "" {
			t.Errorf("no row %q", r.key)
			continue
		}
		if cells := strings.Split(line, "|"); strings.TrimSpace(cells[2]) == "" || strings.TrimSpace(cells[3]) == "" {
			t.Errorf("row %q lacks caddy-mcc or nginx values: %s", r.key, line)
		}
	}
	if !strings.Contains(table, "No failed requests.") {
		t.Errorf("failed requests:\n%s", table)
	}
	if !strings.Contains(table, "| 4 origin bytes / object | 1.00 |") {
		t.Errorf("the cold herd fetched more than the object from the origin:\n%s", table)
	}
	// Issue 11: a request abandoned after its headers costs the origin its
	// first two read-ahead windows (2 + 4 MiB), whatever the object's size;
	// the bound leaves room for the rare client whose kernel takes more
	// than 6 MiB before it closes. (The target is 2 MiB. On loopback the gateway can
	// push megabytes into the kernel's socket buffers of a client that has
	// not yet run to close its connection, which a real link's round trip
	// does not allow; the in-process TestAbandonedRequestsCostAtMostTwoMiB
	// checks the 2 MiB with the close reaching the gateway first.)
	if cells := strings.Split(row("abandon origin MiB / request"), "|"); len(cells) > 2 {
		if v, err := strconv.ParseFloat(strings.TrimSpace(cells[2]), 64); err != nil || v > 8 {
			t.Errorf("an abandoned request cost caddy-mcc %s MiB from the origin, want at most 8", strings.TrimSpace(cells[2]))
		}
	}
}
