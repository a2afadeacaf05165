//go:build !linux

package integration

import "errors"

// establishedConnections needs Linux's /proc.
func establishedConnections(pid, remotePort int) ([]string, error) {
	return nil, errors.ErrUnsupported
}

// listeningSockets needs Linux's /proc.
func listeningSockets(pid int) ([]string, error) {
	return nil, errors.ErrUnsupported
}
