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
	// first read-ahead window, 2 MiB, whatever the object's size.
	if cells := strings.Split(row("abandon origin MiB / request"), "|"); len(cells) > 2 {
		if v, err := strconv.ParseFloat(strings.TrimSpace(cells[2]), 64); err != nil || v > 2 {
			t.Errorf("an abandoned request cost caddy-mcc %s MiB from the origin, want at most 2", strings.TrimSpace(cells[2]))
		}
	}
}
