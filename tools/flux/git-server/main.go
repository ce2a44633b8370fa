// A Git server for the tests and `voucher-dev local --gitops`: smart HTTP on one
// loopback address, the repositories under one directory, each created on its first
// push. It is fluxcd/gitkit, the server Flux's own tests fetch from
// (fluxcd/pkg/gittestserver wraps it), run as a process of its own so that a test
// can stop it mid-sync. No authentication: it must listen on loopback only.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"

	"github.com/fluxcd/gitkit"
)

func main() {
	root := flag.String("root", "", "directory that holds the repositories (created when missing)")
	listen := flag.String("listen", "127.0.0.1:0", "loopback address to serve smart HTTP on")
	flag.Parse()
	if *root == "" {
		fmt.Fprintln(os.Stderr, "error: -root is required")
		os.Exit(2)
	}
	host, _, err := net.SplitHostPort(*listen)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		fmt.Fprintf(os.Stderr, "error: -listen %q is not a loopback address: this server has no authentication\n", *listen)
		os.Exit(2)
	}
	service := gitkit.New(gitkit.Config{Dir: *root, AutoCreate: true})
	if err := service.Setup(); err != nil {
		log.Fatalf("cannot set up %s: %v", *root, err)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *listen, err)
	}
	// The harness reads this line to learn the address (the port may have been 0).
	fmt.Printf("git server listening on http://%s\n", listener.Addr())
	log.Fatal(http.Serve(listener, service))
}
