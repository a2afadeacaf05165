//go:build !linux

package kubetest

import "syscall"

// ChildProcAttr has nothing to set where the kernel cannot tie a child's life
// to its parent's; the tests' cleanup functions stop the children.
func ChildProcAttr() *syscall.SysProcAttr { return nil }
