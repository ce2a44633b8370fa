//go:build tools

// Keeps nats-server's main package a dependency of this module (so that `go mod tidy`
// keeps its require line); build.sh builds it by its import path.
package tools

import _ "github.com/nats-io/nats-server/v2"
