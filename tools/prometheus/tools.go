//go:build tools

// Keeps Prometheus's two main packages dependencies of this module (so that `go mod tidy`
// keeps their require lines); build.sh builds them by their import paths.
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
