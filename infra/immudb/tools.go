//go:build tools

// Package tools pins the immudb server command so `go build` can build it from this module.
package tools

import _ "github.com/codenotary/immudb/cmd/immudb"
