//go:build !linux

package fakecluster_test

import "syscall"

func childProcAttr() *syscall.SysProcAttr { return nil }
