// Command caddy is Caddy with its standard modules and caddy-mcc.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-mcc/caddy-mcc/caddymcc"
)

func main() {
	caddycmd.Main()
}
