// The loopback Git server of the Flux tests (see main.go and ../build.sh).
module voucher-operator/tools/flux/git-server

go 1.26.0

require github.com/fluxcd/gitkit v0.6.0

require (
	github.com/gofrs/uuid v4.2.0+incompatible // indirect
	golang.org/x/crypto v0.58.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
