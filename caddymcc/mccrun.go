package caddymcc

import (
	"fmt"
	"os"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/spf13/cobra"
)

// newRunCommand is `caddy mcc run`: Caddy configured from Microsoft
// Connected Cache's environment variables, the entrypoint of the IoT Edge
// module (deploy/iotedge).
func newRunCommand() *cobra.Command {
	run := &cobra.Command{
		Use:   "run [--print-config]",
		Short: "Runs the cache configured from MCC's environment variables",
		Long: `
Builds a Caddyfile from the environment variables of Microsoft Connected
Cache's IoT Edge module (STORAGE_N_SIZE_GB, UPSTREAM_HOST, UPSTREAM_PROXY,
CACHEABLE_CUSTOM_N_HOST, CACHEABLE_CUSTOM_N_CANONICAL, CACHE_NODE_ID,
IS_SUMMARY_PUBLIC, IS_SUMMARY_ACCESS_UNRESTRICTED, SUMMARY_API_KEY) and
runs Caddy with it until signalled, as 'caddy run' does. Drive N is
<drive-root>/cacheN; content is served on --listen, the summary at
/summary on --summary-listen.

With --print-config, prints the Caddyfile and exits: a starting point for
running caddy-mcc from a Caddyfile of your own.`,
		Args: cobra.NoArgs,
		RunE: cmdRunFromEnv,
	}
	fl := run.Flags()
	fl.Bool("print-config", false, "Print the generated Caddyfile and exit")
	fl.String("drive-root", defaultDriveRoot, "Directory holding the drives' binds, cache1 to cacheN")
	fl.String("listen", defaultListen, "Content listener, host:port or :port")
	fl.String("summary-listen", defaultSummaryListen, "Summary listener, host:port or :port")
	return run
}

func cmdRunFromEnv(cmd *cobra.Command, _ []string) error {
	cmd.SilenceUsage = true
	fl := cmd.Flags()
	opts := mccEnvOptions{IsDir: isDir}
	opts.DriveRoot, _ = fl.GetString("drive-root")
	opts.Listen, _ = fl.GetString("listen")
	opts.SummaryListen, _ = fl.GetString("summary-listen")
	printOnly, _ := fl.GetBool("print-config")

	text, err := caddyfileFromEnv(environ(), opts)
	if err != nil {
		return fmt.Errorf("caddy-mcc: %w", err)
	}
	if printOnly {
		_, err := fmt.Fprint(cmd.OutOrStdout(), text)
		return err
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), map[string]any{"filename": "mcc-env.Caddyfile"})
	if err != nil {
		return fmt.Errorf("caddy-mcc: the generated Caddyfile does not adapt (see caddy mcc run --print-config): %w", err)
	}
	for _, w := range warnings {
		caddy.Log().Warn(w.String())
	}
	// As `caddy run` does: signals stop the server gracefully, and the
	// process serves until then.
	caddy.TrapSignals()
	if err := caddy.Load(cfg, true); err != nil {
		return fmt.Errorf("caddy-mcc: loading the generated config: %w", err)
	}
	caddy.Log().Info("serving initial configuration")
	select {}
}

// environ is the process environment as a map.
func environ() map[string]string {
	env := make(map[string]string)
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}
