package caddymcc

import (
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("mcc", parseCaddyfile)
	// After auth, rewrites and encode; before the proxy that fills misses.
	httpcaddyfile.RegisterDirectiveOrder("mcc", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	mcc {
//	    dir          <path>             # default: Caddy's data dir + /mcc
//	    drive        <path> [<max_size>] # repeatable; instead of dir and max_size
//	    max_size     <size>             # e.g. 50GiB; default: no cap
//	    min_free     <size>             # default: 1GiB
//	    block_size   <size>             # default: 1MiB
//	    origins      <host pattern>...  # repeatable; exact host or *.suffix
//	    canonical    <host> <alias>...  # repeatable; mirrors sharing one cache key
//	    read_ahead   <size>             # default: 16MiB
//	    max_object_size <size>          # default: 64GiB
//	    fill_timeout <duration>         # default: 30s
//	    index_ttl    <duration>         # default: 30s
//	    stale_if_error <duration>       # default: 24h
//	    name         <token>            # default: caddy-mcc
//	    max_levels   <n>                # default: 16
//	    max_fills    <n>                # default: 64
//	}
//
// Paths are subdirectives because a first argument starting with / would be
// taken for a matcher.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "dir":
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Dir = d.Val()
		case "drive":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.ArgErr()
			}
			drive := Drive{Dir: args[0]}
			if len(args) == 2 {
				n, err := parseSize(args[1])
				if err != nil {
					return d.Errf("drive %s: %v", args[0], err)
				}
				drive.MaxSize = n
			}
			h.Drives = append(h.Drives, drive)
		case "max_size", "min_free", "block_size", "read_ahead", "max_object_size":
			name := d.Val()
			if !d.NextArg() {
				return d.ArgErr()
			}
			n, err := parseSize(d.Val())
			if err != nil {
				return d.Errf("%s: %v", name, err)
			}
			switch name {
			case "max_size":
				h.MaxSize = n
			case "min_free":
				h.MinFree = &n
			case "block_size":
				h.BlockSize = n
			case "read_ahead":
				h.ReadAhead = n
			case "max_object_size":
				h.MaxObjectSize = n
			}
		case "origins":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			for _, a := range args {
				if _, err := parseOriginPattern(a); err != nil {
					return d.Err(err.Error())
				}
			}
			h.Origins = append(h.Origins, args...)
		case "canonical":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return d.ArgErr()
			}
			for _, a := range args {
				if err := checkHostName(strings.ToLower(a)); err != nil {
					return d.Errf("canonical %q: %v", a, err)
				}
			}
			if h.Canonical == nil {
				h.Canonical = make(map[string][]string)
			}
			h.Canonical[args[0]] = append(h.Canonical[args[0]], args[1:]...)
		case "fill_timeout", "index_ttl", "stale_if_error":
			name := d.Val()
			if !d.NextArg() {
				return d.ArgErr()
			}
			t, err := caddy.ParseDuration(d.Val())
			if err != nil {
				return d.Errf("%s: %v", name, err)
			}
			switch name {
			case "fill_timeout":
				h.FillTimeout = caddy.Duration(t)
			case "index_ttl":
				h.IndexTTL = caddy.Duration(t)
			case "stale_if_error":
				h.StaleIfError = caddy.Duration(t)
			}
		case "max_levels", "max_fills":
			name := d.Val()
			if !d.NextArg() {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(d.Val())
			if err != nil || n < 1 {
				return d.Errf("%s: %q is not a positive number", name, d.Val())
			}
			if name == "max_fills" {
				h.MaxFills = n
			} else {
				h.MaxLevels = n
			}
		case "name":
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Name = d.Val()
		default:
			return d.Errf("unknown mcc subdirective %q", d.Val())
		}
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	return nil
}

// parseSize reads "50GiB", "1MiB", "500MB" or a plain byte count.
func parseSize(s string) (int64, error) {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, nil
	}
	n, err := humanize.ParseBytes(s)
	if err != nil {
		return 0, err
	}
	return int64(n), nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
