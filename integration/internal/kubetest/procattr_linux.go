package kubetest

import "syscall"

// ChildProcAttr makes the kernel kill a child when the test binary dies, so
// that a test run killed by its timeout leaves no etcd or Caddy behind.
func ChildProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
