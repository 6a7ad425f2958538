package caddymcc

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// xcaddyManifest is the part of xcaddy's Builder (github.com/caddyserver/
// xcaddy, builder.go) that ../xcaddy.json uses, with the same JSON names.
type xcaddyManifest struct {
	CaddyVersion string `json:"caddy_version"`
	Plugins      []struct {
		PackagePath string `json:"module_path"`
		Version     string `json:"version"`
	} `json:"plugins"`
	Replacements []struct {
		Old string `json:"old"`
		New string `json:"new"`
	} `json:"replacements"`
}

// xcaddyBuilderFields are the JSON names of every field of xcaddy v0.4.5's
// Builder (and its embedded Compile), so a misspelt key in the manifest,
// which xcaddy would silently ignore, fails the test instead.
var xcaddyBuilderFields = map[string]bool{
	"os": true, "arch": true, "arm": true, "cgo": true,
	"caddy_version": true, "plugins": true, "replacements": true,
	"timeout_get": true, "timeout_build": true, "race_detector": true,
	"skip_cleanup": true, "skip_build": true, "debug": true,
	"build_flags": true, "mod_flags": true, "embed_dir": true,
}

// goModFile is what TestXcaddyManifestMatchesGoMod needs of go.mod.
type goModFile struct {
	module   string
	requires map[string]string // module path -> version
}

// readGoMod reads the module line and the require directives (one-line and
// block form) of a go.mod file by plain text scanning: the module does not
// depend on golang.org/x/mod, and this test should not add it.
func readGoMod(path string) (goModFile, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return goModFile{}, err
	}
	gm := goModFile{requires: make(map[string]string)}
	inRequire := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.Index(line, "//"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
		case inRequire && f[0] == ")":
			inRequire = false
		case inRequire && len(f) >= 2:
			gm.requires[f[0]] = f[1]
		case f[0] == "module" && len(f) == 2:
			gm.module = strings.Trim(f[1], `"`)
		case f[0] == "require" && len(f) == 2 && f[1] == "(":
			inRequire = true
		case f[0] == "require" && len(f) >= 3:
			gm.requires[f[1]] = f[2]
		}
	}
	if err := sc.Err(); err != nil {
		return goModFile{}, err
	}
	if gm.module == "" {
		return goModFile{}, fmt.Errorf("%s: no module line", path)
	}
	return gm, nil
}

// TestXcaddyManifestMatchesGoMod keeps ../xcaddy.json, the manifest of an
// xcaddy build of Caddy with this plugin, in step with go.mod: the same
// Caddy version, this very package as the plugin, and the module root
// replaced by the checkout so that xcaddy neither fetches the plugin nor
// builds another version of it.
func TestXcaddyManifestMatchesGoMod(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "xcaddy.json"))
	if err != nil {
		t.Fatal(err)
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		t.Fatalf("xcaddy.json: %v", err)
	}
	for k := range keys {
		if !xcaddyBuilderFields[k] {
			t.Errorf("xcaddy.json: %q is not a field of xcaddy's Builder", k)
		}
	}
	var m xcaddyManifest
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("xcaddy.json: %v", err)
	}

	gm, err := readGoMod(filepath.Join("..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	const caddyModule = "github.com/caddyserver/caddy/v2"
	caddyVersion, ok := gm.requires[caddyModule]
	if !ok {
		t.Fatalf("go.mod does not require %s", caddyModule)
	}
	if m.CaddyVersion != caddyVersion {
		t.Errorf("xcaddy.json caddy_version %q, go.mod requires %s %s", m.CaddyVersion, caddyModule, caddyVersion)
	}

	// The plugin is this package, named by its import path.
	pkgPath := reflect.TypeOf(Handler{}).PkgPath()
	if want := gm.module + "/caddymcc"; pkgPath != want {
		t.Fatalf("this package is %s, want %s (go.mod module %s)", pkgPath, want, gm.module)
	}
	if len(m.Plugins) != 1 || m.Plugins[0].PackagePath != pkgPath {
		t.Errorf("xcaddy.json plugins %+v, want exactly one with module_path %q", m.Plugins, pkgPath)
	} else if m.Plugins[0].Version != "" {
		t.Errorf("xcaddy.json plugin version %q: the plugin comes from the checkout, so its version must be empty", m.Plugins[0].Version)
	}

	// xcaddy skips `go get` for a plugin under a replaced module path; the
	// replacement must name the module root (a go.mod replace of a package
	// path does nothing) and point at the directory of this go.mod.
	var replaced bool
	for _, r := range m.Replacements {
		if r.Old != gm.module {
			continue
		}
		replaced = true
		dir := r.New
		if !filepath.IsAbs(dir) {
			dir = filepath.Join("..", dir)
		}
		rm, err := readGoMod(filepath.Join(dir, "go.mod"))
		if err != nil {
			t.Errorf("replacement %s => %s: %v", r.Old, r.New, err)
		} else if rm.module != gm.module {
			t.Errorf("replacement %s => %s holds module %s", r.Old, r.New, rm.module)
		}
	}
	if !replaced {
		t.Errorf("xcaddy.json replacements %+v do not replace the module root %s", m.Replacements, gm.module)
	}
}

// TestReadGoModFindsBothRequireForms checks the go.mod scanner on the
// one-line and block forms of require, with comments.
func TestReadGoModFindsBothRequireForms(t *testing.T) {
	path := filepath.Join(t.TempDir(), "go.mod")
	src := `// a comment
module example.com/m // trailing

go 1.26.0

require example.com/single v1.2.3

require (
	github.com/caddyserver/caddy/v2 v2.11.9
	example.com/indirect v0.1.0 // indirect
)
`
	if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	gm, err := readGoMod(path)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"example.com/single":              "v1.2.3",
		"github.com/caddyserver/caddy/v2": "v2.11.9",
		"example.com/indirect":            "v0.1.0",
	}
	if gm.module != "example.com/m" || !reflect.DeepEqual(gm.requires, want) {
		t.Errorf("got module %q requires %v, want example.com/m %v", gm.module, gm.requires, want)
	}
}
