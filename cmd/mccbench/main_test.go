package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestQuickRunPrintsEveryRow runs the whole benchmark in -quick mode, so
// the harness (servers, scenarios, checksums, table) cannot rot. It asserts
// no timings: only that every scenario ran and nothing failed.
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
	for _, r := range rows {
		line := ""
		for _, l := range strings.Split(table, "\n") {
			if strings.HasPrefix(l, "| "+r.key+" |") {
				line = l
			}
		}
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
}
