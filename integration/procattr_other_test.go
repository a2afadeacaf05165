//go:build !linux

package integration

import "syscall"

// childProcAttr has nothing to set where the kernel cannot tie a child's life
// to its parent's; the tests' cleanup functions stop the children.
func childProcAttr() *syscall.SysProcAttr { return nil }
