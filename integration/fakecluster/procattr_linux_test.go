package fakecluster_test

import "syscall"

// childProcAttr makes the kernel kill a child when the test binary dies, so
// that a test run killed by its timeout leaves no etcd behind.
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
